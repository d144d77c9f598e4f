"""Who may call the management API, and which directories it may load models from.

Registering a model runs its model.py, so an open management API is remote code execution
(TorchServe's "ShellTorch" CVEs). By default only clients on this machine (loopback) may call
it (LMC_MANAGEMENT_ALLOW), and POST /models takes directories under the model roots only
(LMC_ALLOWED_URLS, default: the model store and /opt/ml/model). Inference routes are open.
The peer address decides, never a forwarded-for header a client could write.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from container.config import SAGEMAKER_MODEL_DIR
from engines.contracts import errors as E
from engines.options import ServerOptions

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(spec: str) -> list[Network] | None:
    """LMC_MANAGEMENT_ALLOW as checked by engines.options.parse_networks; "any" is None."""
    if spec == "any":
        return None
    return [ipaddress.ip_network(part) for part in spec.split(",")]


def model_roots(server: ServerOptions) -> list[Path]:
    if server.allowed_urls:
        return [Path(p.strip()).expanduser().resolve()
                for p in server.allowed_urls.split(",") if p.strip()]
    roots = [Path(SAGEMAKER_MODEL_DIR)]
    if server.model_store:
        roots.append(Path(server.model_store).expanduser().resolve())
    return roots


def check_client(request: web.Request, networks: list[Network] | None) -> None:
    if networks is None:
        return
    try:
        peer = ipaddress.ip_address((request.remote or "").split("%")[0])
    except ValueError:
        peer = None
    if peer is not None and any(peer in net for net in networks):
        return
    allowed = ",".join(str(n) for n in networks)
    raise E.Forbidden(f"the management API answers only clients in {allowed} "
                      f"(LMC_MANAGEMENT_ALLOW), not {request.remote}; set LMC_MANAGEMENT_ALLOW "
                      f"to include this client's network (or any) to allow it")


def check_model_dir(path: Path, roots: list[Path]) -> None:
    resolved = path.resolve()
    if any(resolved == root or root in resolved.parents for root in roots):
        return
    raise E.Forbidden(f"url={str(path)!r} is outside the directories models may be registered "
                      f"from ({', '.join(map(str, roots))}); add its folder to LMC_ALLOWED_URLS "
                      f"(comma-separated) to allow it")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def management(handler: Handler) -> Handler:
    """A management route: callable only by the allowed client networks."""
    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        check_client(request, request.app["management_networks"])
        return await handler(request)
    return checked
