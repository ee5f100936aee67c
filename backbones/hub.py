"""Network access that fails in seconds, not minutes: a quick reachability probe, and Hugging Face hub
downloads that read only the local cache when the hub is off (HF_HUB_OFFLINE) or unreachable."""
from __future__ import annotations

import socket
import threading
import urllib.request
from contextlib import contextmanager
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host (or a bare host; port 443 unless given) opens within
    `timeout` seconds, name lookup included. Behind a proxy (HTTPS_PROXY etc., not bypassed by NO_PROXY)
    the proxy is probed instead."""
    parsed = urlparse(url if "//" in url else f"//{url}")
    scheme = parsed.scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname):
        parsed, scheme = urlparse(proxy if "//" in proxy else f"//{proxy}"), "http"
    address = (parsed.hostname, parsed.port or (80 if scheme == "http" else 443))
    opened = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(address)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # name lookup ignores the socket timeout
    thread.start()
    thread.join(timeout)
    return bool(opened)


@contextmanager
def hub_access():
    """Yield None when the Hugging Face hub can be used, else why not ("HF_HUB_OFFLINE is set", "no
    network: cannot reach https://huggingface.co"). When it cannot, hub downloads inside the block read
    only the local cache (huggingface_hub's offline mode), so they fail at once instead of retrying."""
    from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE
    reason = ("HF_HUB_OFFLINE is set" if offline else
              None if reachable(constants.ENDPOINT) else f"no network: cannot reach {constants.ENDPOINT}")
    constants.HF_HUB_OFFLINE = offline or reason is not None
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = offline
