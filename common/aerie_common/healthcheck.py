"""A tiny health probe for containers, so images need no extra binary (grpc-health-probe).

    python -m aerie_common.healthcheck grpc 127.0.0.1:50051            # grpc.health.v1 Check
    python -m aerie_common.healthcheck grpc 127.0.0.1:50051 --service aerie.v1.Verifier
    python -m aerie_common.healthcheck http http://127.0.0.1:8000/ready

Exit status 0 when healthy: for ``grpc``, the standard Health/Check answers SERVING (the
empty service name means the whole server); for ``http``, the URL answers 200. Anything
else, an error, NOT_SERVING or no answer within ``--timeout`` seconds, exits 1 with one
line on stderr saying why. Docker HEALTHCHECK and compose healthchecks use it.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

DEFAULT_TIMEOUT_S = 3.0


def check_grpc(addr: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """Ask ``addr``'s grpc.health.v1 Health/Check about ``service``; (healthy, detail)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return False, f"{addr}: {name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{addr}: {status}"


def check_http(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str]:
    """GET ``url``; healthy iff it answers 200. Redirects are followed by urllib."""
    request = urllib.request.Request(url, headers={"User-Agent": "aerie-healthcheck"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url}: {reason}"
    return status == 200, f"{url}: HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aerie_common.healthcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    grpc_parser = sub.add_parser("grpc", help="grpc.health.v1 Check must answer SERVING")
    grpc_parser.add_argument("addr", help="HOST:PORT")
    grpc_parser.add_argument("--service", default="", help="service name to ask about (default: the server)")
    http_parser = sub.add_parser("http", help="GET must answer 200")
    http_parser.add_argument("url")
    for p in (grpc_parser, http_parser):
        p.add_argument(
            "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default %(default)s)"
        )
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing when healthy")
    args = parser.parse_args(argv)

    if args.kind == "grpc":
        healthy, detail = check_grpc(args.addr, args.service, args.timeout)
    else:
        healthy, detail = check_http(args.url, args.timeout)
    if not healthy:
        print(f"unhealthy: {detail}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"healthy: {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
