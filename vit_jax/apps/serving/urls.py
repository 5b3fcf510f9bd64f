"""Fetching URL inputs safely: public addresses only (unless allowed), each redirect checked.

The host is resolved once, every address it resolves to is checked, and the
connection goes to a checked address, so a name that resolves differently the
second time cannot reach inside.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence

import httpx

from vit_jax.apps.serving import protocol

_MAX_REDIRECTS = 3


# The kinds of address a server must not fetch from unless told to, tested in this order (an
# address can be several: 127.0.0.1 is loopback and private; the first names it best).
_INTERNAL = (
  ("is_unspecified", "unspecified"),
  ("is_loopback", "loopback"),
  ("is_link_local", "link-local"),
  ("is_multicast", "multicast"),
  ("is_reserved", "reserved"),
  ("is_private", "private"),
)


def internal_kind(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
  """The kind of non-public address this is ("loopback", "private", ...); None for a public one."""
  ip = ipaddress.ip_address(address) if isinstance(address, str) else address
  if isinstance(ip, ipaddress.IPv6Address):
    if ip.ipv4_mapped:  # ::ffff:a.b.c.d is a.b.c.d, on an IPv6 socket
      return internal_kind(ip.ipv4_mapped)
    # 6to4 (2002:7f00:1::) and Teredo carry an IPv4 address that a relay would reach.
    embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
    if embedded is not None and internal_kind(embedded):
      return internal_kind(embedded)
  for test, kind in _INTERNAL:
    if getattr(ip, test):
      return kind
  # What is left and still not global: shared address space (100.64.0.0/10) and the like.
  return None if ip.is_global else "non-global"


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
  """The addresses a host name resolves to, in the resolver's order (an IP literal: itself)."""
  infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
  return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlFetcher:
  """GETs URL inputs from public addresses only (unless allowed), connecting to the one checked."""

  def __init__(
    self,
    options: protocol.Options,
    resolve: Resolver = resolve_host,
    transport: httpx.AsyncBaseTransport | None = None,
  ):
    self._options = options
    self._resolve = resolve
    # Redirects are followed here, each hop checked; proxies from the environment are not used
    # (a proxy would resolve the name again); no connection is kept alive, since the pool keys
    # one by address, and a TLS connection checked for one name could carry another's request.
    self._http = httpx.AsyncClient(
      timeout=options.url_timeout_s,
      follow_redirects=False,
      trust_env=False,
      transport=transport,
      limits=httpx.Limits(max_keepalive_connections=0),
    )

  async def aclose(self) -> None:
    await self._http.aclose()

  async def fetch(self, url: str, index: int, max_bytes: int) -> bytes:
    """The body at an http(s) URL, at most max_bytes, or a RequestError saying why not."""
    name = f"input_data[{index}]"
    try:
      async with asyncio.timeout(self._options.url_timeout_s):  # the whole fetch, every hop
        return await self._follow(url, name, max_bytes)
    except protocol.RequestError:
      raise
    except TimeoutError:
      raise protocol.RequestError(
        400,
        f"{name}: cannot fetch {protocol.short(url)} (no answer within "
        f"{self._options.url_timeout_s:g} s)",
      ) from None
    except Exception as e:
      # Whatever a client's URL makes the HTTP client raise (a bad port or host name ends in
      # InvalidURL, ExceptionGroup, OSError, ...) is the client's bad input. Only addresses that
      # passed the check get here, so the message tells nothing of an internal one.
      raise protocol.RequestError(
        400,
        f"{name}: cannot fetch {protocol.short(url)} "
        f"({e.__class__.__name__}: {protocol.short(str(e))})",
      ) from None

  async def _follow(self, url: str, name: str, max_bytes: int) -> bytes:
    """GETs `url`, and the URL it redirects to, up to _MAX_REDIRECTS times."""
    target = httpx.URL(url)
    for hop in range(_MAX_REDIRECTS + 1):
      response = await self._send(target, url, name, redirected=hop > 0)
      try:
        location = response.headers.get("location")
        if response.is_redirect and location:
          target = target.join(location)
          if target.scheme not in ("http", "https") or not target.host:
            raise protocol.RequestError(
              400, f"{name}: {protocol.short(url)} redirects to something other than an http(s) URL"
            )
          continue
        if response.status_code != 200:
          raise protocol.RequestError(
            400, f"{name}: GET {protocol.short(url)} answered HTTP {response.status_code}"
          )
        return await protocol.read_limited(
          response.headers, response.aiter_bytes(), max_bytes, f"{name}: {protocol.short(url)}"
        )
      finally:
        await response.aclose()
    raise protocol.RequestError(
      400, f"{name}: {protocol.short(url)} redirects more than {_MAX_REDIRECTS} times"
    )

  async def _send(self, target: httpx.URL, url: str, name: str, redirected: bool) -> httpx.Response:
    """The response to a GET of `target`, sent to an address of its host that passed the check."""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
      addresses = (
        list(await self._resolve(target.host, port)) if _is_name(target.host) else [target.host]
      )
    except OSError:  # socket.gaierror, and the like
      addresses = []
    if not addresses:
      # Said without the resolver's words: they would tell of internal names.
      raise protocol.RequestError(
        400, f"{name}: cannot fetch {protocol.short(url)} (its host name does not resolve)"
      )
    if not self._options.allow_private_urls:
      for address in addresses:
        kind = internal_kind(address)
        if kind:
          # Said without anything from the target: no address, status or error of what is there.
          where = ("it redirects to a host that" if redirected else "its host") + (
            " resolves to" if _is_name(target.host) else " is"
          )
          article = "an" if kind[0] in "aeiou" else "a"
          raise protocol.RequestError(
            400,
            f"{name}: refused to fetch {protocol.short(url)}: {where} {article} "
            f"{kind} address (this server fetches only from public "
            "addresses; --allow-private-urls allows the others)",
          )
    headers = {"Host": target.netloc.decode("ascii")}
    # TLS: the name goes in SNI and the certificate is checked against it, not the address.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    error = None
    for address in addresses:
      request = self._http.build_request(
        "GET", target.copy_with(host=address), headers=headers, extensions=extensions
      )
      try:
        return await self._http.send(request, stream=True)
      except httpx.ConnectError as e:  # no connection made: the next address may answer
        error = e
    raise error


def _is_name(host: str) -> bool:
  """Whether a URL's host is a name rather than an IP literal."""
  try:
    ipaddress.ip_address(host)
  except ValueError:
    return True
  return False
