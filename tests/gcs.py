"""A local Google Cloud Storage emulator for the ``gs://`` tests (no network, no credentials).

``gcp-storage-emulator`` (a test dependency) serves the GCS JSON API in memory on a free local port.
Both clients of a run point at it through their documented variables: ``gcsfs`` (our file
operations, :mod:`cem_jax.storage`) through ``STORAGE_EMULATOR_HOST``, TensorStore (orbax's
checkpoint arrays) through ``TENSORSTORE_GCS_HTTP_URL``. Two behaviours of real GCS that the
emulator lacks are added (:data:`_SERVER`); the ``moveTo`` call, which it also lacks, is not used
by :mod:`cem_jax.storage`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

BUCKET = "cem-test"

# The emulator, with the generation preconditions of real GCS added (it ignores them): a download
# carries the object's generation in ``x-goog-generation`` and honours ``ifGenerationNotMatch``
# (304) and ``ifGenerationMatch`` (412) -- TensorStore's OCDBT driver, which orbax uses, revalidates
# its cached manifest that way and fails with "Malformed StorageGeneration" without them -- and an
# upload with ``ifGenerationMatch`` fails with 412 unless the object's generation matches (``0``:
# the object must not exist; the precondition that makes a lock's creation exclusive).
_SERVER = """
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

download, insert = objects.download, objects.insert


def query(request, name):
    return (request.query.get(name) or [None])[0]


def generation(storage, bucket, name):
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def with_generation(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    current = generation(storage, bucket, name)
    if current != "0" and query(request, "ifGenerationNotMatch") == current:
        response.status = HTTPStatus.NOT_MODIFIED
        response["x-goog-generation"] = current
        return
    match = query(request, "ifGenerationMatch")
    if match is not None and match != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        response["x-goog-generation"] = generation(storage, bucket, name)
        response["x-goog-metageneration"] = "1"


def with_precondition(request, response, storage, *args, **kwargs):
    name = query(request, "name")
    if name is None and query(request, "uploadType") == "multipart":
        name = request.data["meta"].get("name")
    match = query(request, "ifGenerationMatch")
    if name and match is not None and match != generation(storage, request.params["bucket_name"], name):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    insert(request, response, storage, *args, **kwargs)


objects.download, objects.insert = with_generation, with_precondition  # for calls inside objects
for _, methods in server.HANDLERS:
    for method, fn in list(methods.items()):
        methods[method] = {download: with_generation, insert: with_precondition}.get(fn, fn)
host, port, bucket = sys.argv[1:4]
server.create_server(host, int(port), in_memory=True, default_bucket=bucket).run()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator(log_path: str) -> Iterator[dict[str, str]]:
    """Runs the emulator with bucket :data:`BUCKET`; yields the environment variables that point
    ``gs://`` at it (for ``os.environ`` or a subprocess)."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, "localhost", str(port), BUCKET],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("localhost", port)) == 0:
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the GCS emulator did not start (see {log_path})")
            time.sleep(0.1)
        url = f"http://localhost:{port}"
        yield {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_CLOUD_PROJECT": "cem-test",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Sets ``env`` in ``os.environ`` for the block (and forgets cached GCS clients around it)."""
    from cem_jax import storage

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage.reset()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.reset()
