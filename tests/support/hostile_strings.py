"""Strings an attacker who controls an agent would try in whatever the console shows of it.

Used for agent names, host names, versions, profile names and health messages by the console's tests:
each must reach the page as text, with no script run, no element or attribute injected, and (once
control characters are made visible, see `console.render.shown`) the very characters sent.
Profile names are at most 255 characters, versions 64: the long ones stay within.
"""

from __future__ import annotations

CORPUS: tuple[str, ...] = (
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "<img src=x onerror=alert(2)>",
    "<svg onload=alert(3)>",
    "<svg><script>alert(4)</script></svg>",
    '"><script>alert(5)</script>',
    "' onmouseover='alert(6)' x='",
    '" autofocus onfocus="alert(7)',
    "javascript:alert(8)",
    "<a href=\"javascript:alert(9)\">click</a>",
    "<iframe src=\"javascript:alert(10)\"></iframe>",
    "</td></tr></tbody></table><h1 id=injected>pwned</h1>",
    "</bdi></span><b id=injected>bold</b>",
    "{{7*7}}",
    "${7*7} #{7*7} <%= 7*7 %> {% raw %}",
    "&lt;script&gt;alert(11)&lt;/script&gt;",
    "<!-- comment --><style>body{display:none}</style>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(12)>",
    "<details open ontoggle=alert(13)>",
    "<object data=\"data:text/html,<script>alert(14)</script>\"></object>",
    "\u202egnp.exe\u202c and \u2066isolated\u2069 \u200f",
    "evil\u0000null\u0007bell\u001b[31mred",
    "line one\r\nSet-Cookie: stolen=1",
    "'; DROP TABLE agents; --",
    "\\\"); alert(15); //",
    "<base href=\"https://evil.example/\">",
    "<meta http-equiv=\"refresh\" content=\"0;url=https://evil.example/\">",
    "\U0001f4a3 \u00e9\u0301 \ufeff zero\u200bwidth",
    "A" * 255,
)
