"""Machines that share only the database: the API, two workers and PostgreSQL each on a host of
their own (a network namespace joined to the others by veth pairs on a bridge), each with its
own folders, and a PostgreSQL cluster this test starts for itself.

A job trains on worker A; A is killed (SIGKILL) after its first epoch; worker B resumes it from
the training state A stored in the database; the API, which never saw either worker's files,
serves the model. Skips (saying why) where network namespaces or PostgreSQL's server binaries
are not available; namespaces and cluster are removed whatever happens.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.status import TERMINAL, JobStatus
from service.store import job_repo, metric_repo
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import Job
from tests.conftest import migrate
from tests.jobs import queue_job, read_job
from tests.service.images import png
from tests.support import (
    make_small_mnist,
    process_cmd,
    service_env,
    synthetic_digits,
    wait_for,
)

SUBNET = "10.231.{}.{}"
TIMEOUT_S = 180.0
PG_PORT = 5432
API_PORT = 8000
API_KEY = "multihost-test-key-" + "k" * 16  # the API refuses a non-loopback address without one


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr.decode()}"


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _why_not() -> str | None:
    """Why this machine cannot run the test, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (ip netns)"
    if shutil.which("ip") is None or shutil.which("runuser") is None:
        return "needs iproute2's ip and runuser"
    if _postgres_bin() is None:
        return "needs PostgreSQL's server binaries in /usr/lib/postgresql/*/bin"
    probe = f"mnprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    try:
        subprocess.run(["id", "postgres"], capture_output=True, check=True)
    except subprocess.CalledProcessError:
        return "needs a postgres user to run initdb as"
    return None


@dataclass(frozen=True)
class Host:
    """A network namespace with one address on the bridge, and a folder of its own."""

    netns: str
    address: str
    root: Path
    link: str  # its veth's end on the bridge: off the bridge, the host is cut off

    @property
    def device(self) -> str:
        """Its veth's end inside the host."""
        return self.link.removesuffix("p")

    def command(self, *args: str) -> list[str]:
        """``args`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *args]


class Network:
    """A bridge in a namespace of its own, hosts plugged into it, and this process (the test,
    outside every host) on it too, so that it can reach them."""

    def __init__(self, stack: ExitStack, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag, self.tmp, self.count = tag, tmp, 1
        self.subnet = SUBNET.format(200 + int(tag[:2], 16) % 50, "{}")
        self.switch = f"mnsw{tag}"
        self._namespaces: list[str] = []
        stack.callback(self.remove)
        self._add_namespace(self.switch)
        _run("ip", "netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", "br0", "up")
        # The test's own end: a veth from this namespace to the bridge (gone with the switch).
        self._plug(None, f"mnt{tag}", self.subnet.format(1))

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)

    def _plug(self, netns: str | None, name: str, address: str) -> None:
        peer = f"{name}p"
        _run("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", self.switch)
        in_switch = ("ip", "netns", "exec", self.switch)
        _run(*in_switch, "ip", "link", "set", peer, "master", "br0")
        _run(*in_switch, "ip", "link", "set", peer, "up")
        inside: tuple[str, ...] = ()
        if netns is not None:
            _run("ip", "link", "set", name, "netns", netns)
            inside = ("ip", "netns", "exec", netns)
            _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{address}/24", "dev", name)
        _run(*inside, "ip", "link", "set", name, "up")

    def host(self, name: str) -> Host:
        """A new host on the network, with an empty folder of its own."""
        self.count += 1
        netns = f"mn{name}{self.tag}"
        self._add_namespace(netns)
        address = self.subnet.format(self.count)
        self._plug(netns, f"mnv{self.count}{self.tag}", address)
        root = self.tmp / name
        root.mkdir()
        return Host(netns, address, root, f"mnv{self.count}{self.tag}p")

    def cut(self, host: Host, *, off: bool) -> None:
        """A partition: ``host``'s packets are lost on the way, without a word to either side,
        until it is joined again: its link leaves the bridge, and stays up. (A link set down
        would tell the host's own TCP, which then tries every half second, not ever later.)"""
        joined = ("nomaster",) if off else ("master", "br0")
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", host.link, *joined)

    def pin_neighbours(self, one: Host, other: Host) -> None:
        """Each host knows the other's hardware address for good: a partition then loses IP
        packets alone. (Else an address the kernel no longer knows fails TCP's sends at home,
        which it retries every half second, and whether that happens within a partition
        depends on a timer drawn at random.)"""
        for here, there in ((one, other), (other, one)):
            mac = subprocess.run(
                [*there.command("cat", f"/sys/class/net/{there.device}/address")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            neighbour = ("neigh", "replace", there.address, "lladdr", mac, "dev", here.device)
            _run(*here.command("ip", *neighbour, "nud", "permanent"))

    def remove(self) -> None:
        """Delete every namespace (their veth pairs go with them); the test's veth too."""
        for name in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", f"mnt{self.tag}"], capture_output=True, check=False)


@contextmanager
def postgres_on(host: Host) -> Iterator[str]:
    """A PostgreSQL cluster of its own, run by the postgres user on ``host``'s address, trusting
    the subnet; its URL. Stopped and deleted on exit."""
    bin_dir = _postgres_bin()
    assert bin_dir is not None
    # The postgres user cannot enter pytest's folders (root's, mode 700): a folder of its own.
    cluster = Path(tempfile.mkdtemp(prefix="mnist-multihost-pg-"))
    shutil.chown(cluster, "postgres", "postgres")
    data, sockets = cluster / "data", cluster / "sockets"
    as_postgres = ("runuser", "-u", "postgres", "--")
    _run(*as_postgres, "mkdir", str(data), str(sockets))
    _run(*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    subnet = host.address.rsplit(".", 1)[0] + ".0/24"
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {subnet} trust\n")
    options = f"-c listen_addresses={host.address} -p {PG_PORT} -k {sockets} -c fsync=off"
    pg_ctl = (*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data))
    log = cluster / "postgres.log"
    try:
        _run(*host.command(*pg_ctl, "-o", options, "-l", str(log), "-w", "start"))
        yield f"postgresql+psycopg://postgres@{host.address}:{PG_PORT}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, check=False)
        shutil.rmtree(cluster, ignore_errors=True)


def database_on(stack: ExitStack, host: Host) -> tuple[str, sessionmaker[Session]]:
    """The service's database on ``host`` (:func:`postgres_on`), migrated: its URL, and this
    test's sessions on it, closed with ``stack``."""
    url = stack.enter_context(postgres_on(host))
    migrate(url)
    engine = make_engine(url)
    stack.callback(engine.dispose)
    return url, make_sessionmaker(engine)


def host_env(machine: Host, database_url: str, **settings: str) -> dict[str, str]:
    """What a machine of the service needs: the database's URL, artifacts in the database, the
    data set, and folders of its own."""
    data = make_small_mnist(machine.root / "data", train=2000, test=200)
    return service_env(
        database_url=database_url,
        artifacts="database",
        data_dir=str(data),
        checkpoint_dir=str(machine.root / "models"),
        device="cpu",
        **settings,
    )


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    reason = _why_not()
    if reason is not None:
        pytest.skip(f"multi-host test: {reason}")
    with ExitStack() as stack:
        yield Network(stack, tmp_path)


def steps_of(sessions: sessionmaker[Session], job_id: str) -> list[int]:
    with sessions() as session:
        rows = metric_repo.read_steps(session, job_id, after_step=0, limit=100_000)
    return [r["step"] for r in rows]


def test_a_job_killed_on_one_host_resumes_on_another_and_is_served_by_a_third(
    network: Network, tmp_path: Path
) -> None:
    db_host, api_host = network.host("db"), network.host("api")
    host_a, host_b = network.host("a"), network.host("b")
    with ExitStack() as stack:
        url, sessions = database_on(stack, db_host)
        worker_settings = {
            "lease_s": "2",
            "heartbeat_s": "0.5",
            "flush_interval_s": "0.1",
            "torch_threads": "1",
        }
        env_a = host_env(host_a, url, **worker_settings)
        job_id = queue_job(
            sessions,
            {"epochs": 3, "batch_size": 1, "trainset_size": 2000, "testset_size": 200, "seed": 7},
        )
        worker_a = stack.enter_context(
            process_cmd(
                host_a.command(sys.executable, "-m", "workers"), env_a, tmp_path / "worker-a.log"
            )
        )

        def epoch_one_kept() -> bool:
            # Under the job row's lock: A cannot write on while it is killed.
            with sessions.begin() as session:
                job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
                if job.resume_epoch < 1:
                    return False
                assert job.status == JobStatus.RUNNING and job.step < job.total_steps
                worker_a.send_signal(signal.SIGKILL)
                worker_a.wait(timeout=30)
                return True

        wait_for(epoch_one_kept, timeout_s=TIMEOUT_S, what="worker A to keep epoch 1", every_s=0.02)

        env_b = host_env(host_b, url, **worker_settings)
        log_b = tmp_path / "worker-b.log"
        stack.enter_context(
            process_cmd(host_b.command(sys.executable, "-m", "workers"), env_b, log_b)
        )

        def ended() -> Job | None:
            job = read_job(sessions, job_id)
            return job if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED) else None

        job = wait_for(ended, timeout_s=TIMEOUT_S, what="the job to end on worker B")
        assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 2), job.error
        assert "resuming after epoch" in log_b.read_text()
        assert steps_of(sessions, job_id) == list(range(1, job.total_steps + 1))
        with sessions() as session:
            assert session.scalar(text("SELECT count(*) FROM artifacts")) == 1  # the weights

        api_env = host_env(
            api_host, url, host=api_host.address, port=str(API_PORT), api_key=API_KEY
        )
        stack.enter_context(
            process_cmd(
                api_host.command(sys.executable, "-m", "service"), api_env, tmp_path / "api.log"
            )
        )
        client = stack.enter_context(
            httpx.Client(
                base_url=f"http://{api_host.address}:{API_PORT}",
                timeout=30,
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        )

        def healthy() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=60, what="the API to answer on its host")
        digit = png(synthetic_digits(1, seed=3)[0][0])
        answer = client.post(
            f"/predict?job_id={job_id}", files={"file": ("d.png", digit, "image/png")}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["job_id"] == job_id
        for host in (api_host, host_a, host_b):  # no machine wrote a file of the model
            assert not (host.root / "models").exists() or not any((host.root / "models").iterdir())


def test_a_partition_shorter_than_the_lease_leaves_the_job_with_its_worker(
    network: Network, tmp_path: Path
) -> None:
    """Worker A is cut off from the database for 14 s of its 24-s lease while it trains, then
    joined again: it writes on within seconds, keeping its job (attempt 1), and worker B, ready
    to take any lease that runs out, takes nothing.

    TCP retries a lost send about 0.2 s after it, then twice as late each time: A's write
    begun as the partition began went again about 13 s and 26 s after it (`ss -ti`), and the
    server's answer to a statement cut off mid-transaction likewise, holding that
    transaction's row locks till then. Before both ends of a worker's connections gave up a
    stall within a sixth of the lease (:func:`service.store.engines.stall_limits`), A wrote
    again only 27 s after the cut, or B had taken the job over (attempt 2)."""
    db_host, host_a, host_b = network.host("db"), network.host("a"), network.host("b")
    with ExitStack() as stack:
        url, sessions = database_on(stack, db_host)
        worker_settings = {
            "lease_s": "24",
            "heartbeat_s": "1",
            "flush_interval_s": "0.1",
            "poll_interval_s": "0.2",  # B looks for a lease run out five times a second
            "torch_threads": "1",
            "outage_buffer_steps": "1000",  # A trains on only so far while its writes wait
        }
        # Long enough to train on until well after the lease would have run out.
        params = {"epochs": 20, "batch_size": 1, "trainset_size": 2000, "testset_size": 200}
        job_id = queue_job(sessions, params)
        env_a = host_env(host_a, url, **worker_settings)
        command = [sys.executable, "-m", "workers"]
        stack.enter_context(process_cmd(host_a.command(*command), env_a, tmp_path / "worker-a.log"))

        def training() -> bool:
            job = read_job(sessions, job_id)
            return job.status == JobStatus.RUNNING and job.step > 0

        wait_for(training, timeout_s=TIMEOUT_S, what="worker A to train the job")
        env_b = host_env(host_b, url, **worker_settings)
        log_b = tmp_path / "worker-b.log"
        stack.enter_context(process_cmd(host_b.command(*command), env_b, log_b))
        wait_for(
            lambda: "ready" in log_b.read_text(), timeout_s=TIMEOUT_S, what="worker B to be ready"
        )
        network.pin_neighbours(host_a, db_host)
        network.cut(host_a, off=True)
        stack.callback(network.cut, host_a, off=False)
        cut_off = read_job(sessions, job_id)  # A's last write: nothing of A's comes in now
        began = time.monotonic()
        time.sleep(14)  # the partition simulated
        network.cut(host_a, off=False)

        def written_on() -> Job | None:
            job = read_job(sessions, job_id)
            return job if job.step > cut_off.step else None

        job = wait_for(written_on, timeout_s=TIMEOUT_S, what="A's steps to be written again")
        back_after_s = time.monotonic() - began
        assert (job.status, job.attempt, job.worker_id) == (JobStatus.RUNNING, 1, cut_off.worker_id)
        # Before the lease would have run out: not at TCP's next try of the stalled write.
        assert back_after_s < 24, f"A's writes came back {back_after_s:.1f} s after the cut"
        with sessions.begin() as session:
            job_repo.request_cancel(session, session.get_one(Job, job_id), now=utcnow())

        def ended() -> Job | None:
            job = read_job(sessions, job_id)
            return job if job.status in TERMINAL else None

        job = wait_for(ended, timeout_s=TIMEOUT_S, what="the job to end")
        assert (job.status, job.attempt) == (JobStatus.CANCELLED, 1), job.error
        assert job_id not in log_b.read_text()
        assert steps_of(sessions, job_id) == list(range(1, job.step + 1))
