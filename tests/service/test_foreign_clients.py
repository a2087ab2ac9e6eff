"""Schedulers not written in Python: clients that know only docs/protocol.md, against a real worker.

One is tests/service/raw_client.py (the `redis` package, json, base64: what a Go or Rust scheduler writes);
the other is Node.js with the `celery-node` package from npm, installed into a temporary directory once per
session when `node` and `npm` are on the PATH (scripts/bootstrap.sh installs them from Debian).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.raw_client import RawClient
from tests.workers import Host, StartHost

pytestmark = pytest.mark.slow

#: Pinned: the test reads its AsyncResult error shape and uses createTaskMessage/sendTaskMessage.
CELERY_NODE = "celery-node@0.5.9"
NPM_TIMEOUT_S = 180

NODE_SCRIPT = r"""
// Follows docs/protocol.md with celery-node: the host's queue, an `expires` header, the result's JSON.
const celery = require("celery-node");
const [url, host] = process.argv.slice(2);
const client = celery.createClient(url, url, `rootfs.host.${host}`);

function send(task, kwargs, expiresInS) {
  const id = require("crypto").randomUUID();
  const message = client.createTaskMessage(id, task, [], { ...kwargs, host });
  if (expiresInS) message.headers.expires = new Date(Date.now() + expiresInS * 1000).toISOString();
  client.sendTaskMessage(task, message);
  return client.asyncResult(id).get(30000, 20);
}

async function outcome(promise) {
  try {
    return { ok: await promise };
  } catch (err) {  // FAILURE: celery-node throws an Error carrying exc_type, exc_message, exc_module
    return { status: err.message, exc_type: err.exc_type, exc_message: err.exc_message };
  }
}

(async () => {
  const out = {};
  out.clone = await outcome(send("rootfs.clone_for_vm", { vm_id: "vm-node", stack: "base" }, 600));
  out.missing = await outcome(send("rootfs.clone_for_vm", { vm_id: "vm-x", stack: "no-such-stack" }, 600));
  out.release = await outcome(send("rootfs.release_vm", { vm_id: "vm-node" }));
  console.log(JSON.stringify(out));
  await client.disconnect();
  process.exit(0);
})().catch((err) => { console.error(err); process.exit(1); });
"""


@pytest.fixture
def host_a(start_host: StartHost) -> Host:
    a = start_host("a")
    a.template("base", b"base-template")
    return a


def test_redis_only_client_clones_gets_stack_not_found_and_releases(host_a: Host, redis_url: str) -> None:
    """A client built from docs/protocol.md alone gets the documented result JSON and error shape."""
    client = RawClient(redis_url)
    try:
        clone = client.call("a", "rootfs.clone_for_vm", {"vm_id": "vm-42", "stack": "base"})
        assert clone["status"] == "SUCCESS"
        assert clone["result"]["path"] == str(host_a.clones_dir / "vm-42" / "rootfs.ext4")
        assert set(clone["result"]) == {
            "vm_id",
            "stack",
            "path",
            "source_sha256",
            "method",
            "host",
            "hashed_bytes",
            "seconds",
        }
        assert (host_a.clones_dir / "vm-42" / "rootfs.ext4").read_bytes() == b"base-template"

        missing = client.call("a", "rootfs.clone_for_vm", {"vm_id": "vm-43", "stack": "nope"})
        assert missing["status"] == "FAILURE"
        assert missing["result"]["exc_type"] == "StackNotFound"
        assert missing["result"]["exc_message"] == ["nope", str(host_a.template_dir)]  # [stack, template_dir]
        assert not (host_a.clones_dir / "vm-43").exists()

        release = client.call("a", "rootfs.release_vm", {"vm_id": "vm-42"})
        assert release["result"] == {"vm_id": "vm-42", "released": True, "host": "a"}
        assert not (host_a.clones_dir / "vm-42").exists()
    finally:
        client.close()


@pytest.fixture(scope="session")
def celery_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with celery-node installed from npm (once per session), or a skip saying why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (scripts/bootstrap.sh installs them from Debian)")
    root = tmp_path_factory.mktemp("celery-node")
    (root / "package.json").write_text('{"name": "rootfs-foreign-client", "private": true}\n')
    try:
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", "--cache", str(root / ".npm"), CELERY_NODE],
            cwd=root,
            check=True,
            capture_output=True,
            timeout=NPM_TIMEOUT_S,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"npm install {CELERY_NODE} failed (registry unreachable?): {stderr.decode()[-300:]}")
    (root / "client.js").write_text(NODE_SCRIPT)
    yield root


def test_node_celery_node_client_clones_gets_stack_not_found_and_releases(
    host_a: Host, redis_url: str, celery_node: Path
) -> None:
    """celery-node from npm, sending to the host's queue with `expires`, clones, fails on a missing stack, releases."""
    proc = subprocess.run(
        ["node", "client.js", redis_url, "a"],
        cwd=celery_node,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out["clone"]["ok"]["vm_id"] == "vm-node"
    assert out["clone"]["ok"]["path"] == str(host_a.clones_dir / "vm-node" / "rootfs.ext4")
    assert out["missing"] == {
        "status": "FAILURE",
        "exc_type": "StackNotFound",
        "exc_message": ["no-such-stack", str(host_a.template_dir)],
    }
    assert out["release"]["ok"] == {"vm_id": "vm-node", "released": True, "host": "a"}
    assert not (host_a.clones_dir / "vm-node").exists()
    assert "dropped a message" not in host_a.worker.log()
