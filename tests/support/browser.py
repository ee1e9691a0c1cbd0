"""A real browser for the console's tests: Debian's Chromium, headless, driven through its chromedriver.

The browser trusts the control plane's certificate by its public key (`--ignore-certificate-errors-spki-list`
names the SHA-256 of the server certificate's key), not by ignoring certificate errors: a console served
with any other key is refused as it would be in an operator's browser.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

T = TypeVar("T")


def spki_sha256(certificate_pem: bytes) -> str:
    """The base64 SHA-256 of a certificate's SubjectPublicKeyInfo, as Chromium's SPKI list wants it."""
    key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def chromium(server_certificate: Path, *, width: int = 1440, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium that accepts the console's certificate (and only its key), with its console log kept."""
    for program in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(program) is None:
            # Not a skip: CI installs both (tools/setup_system.sh); a machine without them must fail loudly.
            raise RuntimeError(f"{program} is missing: run tools/setup_system.sh (apt: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     f"--window-size={width},{height}", "--force-device-scale-factor=1", "--lang=en-US",
                     f"--ignore-certificate-errors-spki-list={spki_sha256(server_certificate.read_bytes())}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    return driver


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], within: float, message: str = "") -> T:
    """Poll the page until `condition` is true (returning its value), for at most `within` seconds."""
    result: Any = WebDriverWait(driver, within, poll_frequency=0.2).until(condition, message)
    return result  # type: ignore[no-any-return]


def text_of(driver: WebDriver, css: str) -> list[str]:
    """The exact DOM text (`textContent`, not the rendered `innerText`) of each element that matches."""
    texts: list[str] = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent);", css)
    return texts


def console_log(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """What the page logged to the browser's console since the last call (messages, CSP refusals, errors)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return entries
