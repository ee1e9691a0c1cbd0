// The onprem console's only script: refreshes a page's data in place every few seconds.
// Loaded from the console itself (the Content-Security-Policy allows no inline script). The fresh page
// is parsed with DOMParser, which runs no script, and only its <main> is swapped in: everything in it
// was rendered and escaped by the server, exactly as on a full load.
"use strict";

(function () {
  const main = document.querySelector("main[data-refresh]");
  if (!main) {
    return;
  }
  const seconds = Math.max(1, Number(main.dataset.refresh) || 5);
  const status = document.getElementById("refreshed");

  function say(text, state) {
    if (status) {
      status.textContent = text;
      status.dataset.state = state;
    }
  }

  async function refresh() {
    let response;
    try {
      response = await fetch(window.location.href, {
        credentials: "same-origin",
        cache: "no-store",
        redirect: "manual",
        headers: { "X-Console-Refresh": "1" },
      });
    } catch (error) {
      say("cannot reach the control plane; retrying", "stale");
      return;
    }
    if (response.status === 401 || response.type === "opaqueredirect") {
      // The session ended (logged out, expired, token revoked): the full page says why.
      window.location.reload();
      return;
    }
    if (!response.ok) {
      say(`refresh failed (HTTP ${response.status}); retrying`, "stale");
      return;
    }
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html").querySelector("main");
    if (!fresh) {
      return;
    }
    // A copy first: adopting a node takes it out of `fresh`, whose childNodes list is live.
    const nodes = Array.from(fresh.childNodes);
    main.replaceChildren(...nodes.map((node) => document.adoptNode(node)));
    say(`updated ${new Date().toLocaleTimeString()}`, "fresh");
  }

  async function loop() {
    await refresh();
    window.setTimeout(loop, seconds * 1000);
  }

  window.setTimeout(loop, seconds * 1000);
})();
