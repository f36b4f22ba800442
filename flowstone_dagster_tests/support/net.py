"""Loopback helpers shared by the tests and the bench scripts."""

from __future__ import annotations

import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def trickling_server(*, interval: float = 0.25, size: int = 400) -> tuple[str, threading.Event]:
    """A loopback server that answers 200 and sends its ``size``-byte body 2 bytes at a time,
    one pair every ``interval`` seconds (each gap well below any read timeout)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        with listener:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(65536)
                    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n"
                    try:
                        conn.sendall(head.encode())
                        for _ in range(size // 2):
                            if stop.wait(interval):
                                return
                            conn.sendall(b"ab")
                    except OSError:
                        continue

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/slow", stop
