"""The TCP connection ssh would make to a host, made with TCP_NODELAY set from its first
byte and handed to ssh: ssh runs this as its ProxyCommand with ProxyUseFdpass=yes.

Why: OpenSSH sets TCP_NODELAY on its socket only once an interactive session is up,
never during the key exchange. There it writes twice before it reads, so Nagle's
algorithm holds the second small packet until the server's delayed ACK: two stalls of
~40 ms in each login (strace of a login to `rclone serve sftp`: 95 ms, of which ~10 ms
are ssh's CPU; with this, 29 ms).

How: ssh_command.SshCommand.dialer() decides when ssh gets this (never when the user's
~/.ssh/config has a proxy of its own, a bind address or more than one attempt) and
passes what `ssh -G` resolved: `python -I -S ssh_dialer.py HOST PORT FAMILY TIMEOUT
KEEPALIVE`. C modules only (`_socket`, not `socket`, whose import takes ~7 ms), so it
starts in ~6 ms. It tries the host's addresses in order within the timeout, as ssh
does, and fails as ssh says its own failures (ssh_command reads them): one line on
stderr, exit status 255.
"""
import _socket
import posix   # (loaded at start: os is not)
import sys
import time

_FAMILIES = {"any": _socket.AF_UNSPEC, "inet": _socket.AF_INET, "inet6": _socket.AF_INET6}


def dial(host: str, port: str, family: str, timeout: str, keepalive: str):
    """The connected socket, or raise SystemExit with ssh's words for why not."""
    deadline = None if timeout == "none" else time.monotonic() + float(timeout)
    try:
        # as bytes, as ssh looks it up: a str goes through IDNA first, which refuses names
        # (an empty or a 64-byte label) that the resolver just does not know
        addresses = _socket.getaddrinfo(host.encode(sys.getfilesystemencoding(),
                                                    "surrogateescape"),
                                        port, _FAMILIES[family], _socket.SOCK_STREAM)
    except _socket.gaierror as exc:
        raise SystemExit(f"ssh: Could not resolve hostname {host}: {exc.strerror}")
    why = "failure"
    for family_, kind, proto, _, address in addresses:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            why = "Connection timed out"
            break
        sock = None
        try:
            # (a family the kernel lacks, IPv6 off at boot: that address failed, as in ssh)
            sock = _socket.socket(family_, kind, proto)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            if keepalive == "yes":
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
            sock.settimeout(left)
            sock.connect(address)
            sock.settimeout(None)   # a blocking socket, as ssh's own connect leaves it
            return sock
        except TimeoutError:
            why = "Connection timed out"
        except OSError as exc:
            why = exc.strerror or "failure"
        if sock is not None:
            sock.close()
    raise SystemExit(f"ssh: connect to host {host} port {port}: {why}")


def say(line: str) -> None:
    """A line on stderr (ssh's, which castlib reads), unbuffered, and never an error: with
    castlib gone (kill -9) nobody reads it, and the socket must still reach ssh."""
    try:
        posix.write(2, (line + "\n").encode("utf-8", "surrogateescape"))
    except OSError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[2] not in _FAMILIES:
        say("usage: ssh_dialer.py HOST PORT any|inet|inet6 SECONDS|none yes|no")
        return 255
    try:
        sock = dial(*argv)
        failed = False
    except (SystemExit, Exception) as said:
        # anything else still ends as a failure said in ssh's words, with a socket handed
        # over (below): a traceback would leave ssh without one, and this process unreaped
        say(said.code if isinstance(said, SystemExit) else
            f"ssh: connect to host {argv[0]} port {argv[1]}: {said}")
        # ssh gets a connection closed at once, which it reads as a line lost after the
        # words above: an ssh that gets none exits without waiting for this process,
        # which is then a zombie wherever the init that inherits it reaps nothing (a
        # container whose first process is castlib)
        sock, closed = _socket.socketpair()
        closed.close()
        failed = True
    try:
        ssh = _socket.socket(fileno=1)   # ssh's end of a socketpair (ProxyUseFdpass)
        ssh.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                               sock.fileno().to_bytes(4, sys.byteorder))])
    except OSError as exc:
        say(f"ssh_dialer: cannot hand the connection to ssh on stdout: {exc.strerror}")
        return 255
    return 255 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
