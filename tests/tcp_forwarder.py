"""A TCP forwarder that stands in for `fly proxy` in the tests: a real process, 127.0.0.1 only.

Usage: ``python tests/tcp_forwarder.py LISTEN_PORT TARGET_HOST TARGET_PORT``. It listens on
127.0.0.1:LISTEN_PORT and copies bytes both ways between each client and TARGET_HOST:TARGET_PORT,
printing one line once it listens (as `fly proxy` does) and one line per connection.
"""

from __future__ import annotations

import asyncio
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # one side closed: close the other so that neither end waits forever
        writer.close()


async def _serve(listen_port: int, target_host: str, target_port: int) -> None:
    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(target_host, target_port)
        except OSError as exc:
            print(f"cannot reach {target_host}:{target_port}: {exc}", flush=True)
            client_writer.close()
            return
        print(f"connection from {client_writer.get_extra_info('peername')}", flush=True)
        await asyncio.gather(_pump(client_reader, upstream_writer),
                             _pump(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"Proxying local port {listen_port} to {target_host}:{target_port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: tcp_forwarder.py LISTEN_PORT TARGET_HOST TARGET_PORT", file=sys.stderr)
        return 2
    asyncio.run(_serve(int(argv[0]), argv[1], int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
