"""Stream sessions: have/want, batched acks in the log, and resume as a transition of the same session."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.charts.registry import ChartRegistry
from engine.chunks import MemoryChunkStore
from engine.clock import ManualClock
from engine.log.memory import MemoryRecorder
from engine.machines.runtime import Runtime
from engine.streams import ReceiveSession, SendSession
from engine.tensors import load, pack, store


class Died(Exception):
    """Stands for the receiving process dying mid-transfer."""


def setup(charts: ChartRegistry, clock: ManualClock) -> tuple[Runtime, MemoryChunkStore, MemoryChunkStore, str]:
    runtime = Runtime(MemoryRecorder(), charts, clock=clock, run_timers=False)
    source = MemoryChunkStore()
    model = {f"w{i}": torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    digest = store(pack(model, chunk_size=4096), source)  # 5 tensors x 4 chunks
    return runtime, source, MemoryChunkStore(), digest


def triggers(runtime: Runtime, session: str) -> list[str]:
    return [e.trigger for e in runtime.recorder.read(machine_id=session)]


def test_receive_records_offer_want_batched_acks_and_completion(charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, sink, digest = setup(charts, clock)
    fetched: list[str] = []

    def fetch(d: str) -> bytes:
        fetched.append(d)
        return source.get(d)

    manifest, report = ReceiveSession(runtime, sink, fetch, "recv:a", in_flight=3, ack_every=8).run(digest)
    assert report.chunks_wanted == 20 and report.bytes_moved == manifest.nbytes and not report.resumed
    assert triggers(runtime, "recv:a") == ["create", "offer", "want", "start", "ack", "ack", "ack", "complete"]
    acks = [e.data for e in runtime.recorder.read(machine_id="recv:a") if e.trigger == "ack"]
    assert [a["chunks"] for a in acks] == [8, 8, 4] and acks[-1]["acked"] == 20
    assert torch.equal(load(sink, digest)["w3"], load(source, digest)["w3"])
    # the same payload again (an unchanged model): only the session, no chunk moves
    fetched.clear()
    _, again = ReceiveSession(runtime, sink, fetch, "recv:b").run(digest)
    assert fetched == [] and again.chunks_wanted == 0 and again.chunks_skipped == 20
    assert triggers(runtime, "recv:b") == ["create", "offer", "want", "complete"]


def test_a_cut_transfer_resumes_the_same_session_without_refetching_acked_chunks(
        charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, sink, digest = setup(charts, clock)
    count = 0

    def dies_after_ten(d: str) -> bytes:
        nonlocal count
        count += 1
        if count > 11:  # the manifest, then ten chunks
            raise Died()
        return source.get(d)

    with pytest.raises(Died):
        ReceiveSession(runtime, sink, dies_after_ten, "recv:x", in_flight=1, ack_every=4).run(digest)
    acked = sum(e.data["chunks"] for e in runtime.recorder.read(machine_id="recv:x") if e.trigger == "ack")
    assert acked == 8 and runtime.get("recv:x").state == "transferring"
    refetched: list[str] = []

    def fetch(d: str) -> bytes:
        refetched.append(d)
        return source.get(d)

    _, report = ReceiveSession(runtime, sink, fetch, "recv:x", in_flight=1, ack_every=4).run(digest)
    assert report.resumed and report.chunks_wanted == 10  # 10 arrived (8 acked, 2 not yet), 10 to go
    assert len(refetched) == 10
    assert triggers(runtime, "recv:x")[-6:] == ["interrupt", "resume", "ack", "ack", "ack", "complete"]
    assert load(sink, digest).keys() == load(source, digest).keys()


def test_send_pushes_only_what_the_peer_lacks_manifest_last(charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, peer, digest = setup(charts, clock)
    order: list[str] = []

    def put(d: str, data: Any) -> None:
        order.append(d)
        peer.put(d, data)

    from engine.tensors import Manifest

    for d in Manifest.from_bytes(source.get(digest)).chunk_digests()[:7]:  # the peer holds some chunks already
        peer.put(d, source.get(d))
    report = SendSession(runtime, source, peer.missing, put, "send:a", ack_every=5).run(digest)
    assert order[-1] == digest and peer.missing(source.digests()) == []
    assert report.chunks_wanted == 20 - 7 and report.chunks_skipped == 7
    assert triggers(runtime, "send:a")[:4] == ["create", "offer", "want", "start"]


def test_send_reads_without_hashing_and_a_corrupt_stored_copy_is_refused_by_the_peer(
        charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, peer, digest = setup(charts, clock)
    from engine.chunks.base import ChunkIntegrityError
    from engine.tensors import Manifest

    chunk_digests = Manifest.from_bytes(source.get(digest)).chunk_digests()
    verified_reads: list[str] = []
    plain_get = source.get

    def get(d: str, *, verify: bool = True) -> bytes:
        if verify:
            verified_reads.append(d)
        return plain_get(d, verify=verify)

    source.get = get  # type: ignore[method-assign]
    SendSession(runtime, source, peer.missing, peer.put, "send:views", put_many=lambda cs: [peer.put(d, b) for d, b in cs],
                batch=4).run(digest)
    # the chunks were read without hashing them here: the peer verifies each on write
    assert not set(verified_reads) & set(chunk_digests) and peer.missing(chunk_digests) == []
    # a stored copy that rotted is refused by the peer, names its chunk, and is never stored there
    bad = chunk_digests[3]
    source._chunks[bad] = b"\0" + plain_get(bad)[1:]
    fresh = MemoryChunkStore()
    with pytest.raises(ChunkIntegrityError, match=bad):
        SendSession(runtime, source, fresh.missing, fresh.put, "send:rotted").run(digest)
    assert fresh.missing([bad]) == [bad] and fresh.missing([digest]) == [digest]


def test_batched_sessions_move_several_chunks_a_request_and_refetch_only_a_bad_copy(
        charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, sink, digest = setup(charts, clock)
    from engine.tensors import Manifest

    singles: list[str] = []
    requests: list[list[str]] = []
    target = Manifest.from_bytes(source.get(digest)).chunk_digests()[7]  # in the second request
    corrupted: set[str] = set()

    def fetch(d: str) -> bytes:
        singles.append(d)
        return source.get(d)

    def fetch_many(ds: list[str]) -> list[Any]:
        requests.append(ds)
        out = [source.get(d) for d in ds]
        if target in ds:  # one bad copy in an answer
            i = ds.index(target)
            out[i] = bytes([out[i][0] ^ 1]) + out[i][1:]
            corrupted.add(target)
        return out

    manifest, report = ReceiveSession(runtime, sink, fetch, "recv:m", fetch_many=fetch_many, batch=6,
                                      in_flight=2, ack_every=8).run(digest)
    assert [len(r) for r in requests] == [6, 6, 6, 2]  # 20 chunks, 6 to a request
    assert corrupted == {target} and singles == [digest, target]  # the manifest; then the bad copy again, alone
    assert report.chunks_wanted == 20 and report.bytes_moved == manifest.nbytes
    assert sink.missing(source.digests()) == []
    acks = [e.data for e in runtime.recorder.read(machine_id="recv:m") if e.trigger == "ack"]
    assert sum(a["chunks"] for a in acks) == 20 and acks[-1]["acked"] == 20
    # and up: several to an upload, the manifest last
    peer = MemoryChunkStore()
    uploads: list[list[str]] = []

    def put_many(chunks: list[tuple[str, Any]]) -> None:
        uploads.append([d for d, _ in chunks])
        for d, data in chunks:
            peer.put(d, data)

    def put(d: str, data: Any) -> None:
        uploads.append([d])
        peer.put(d, data)

    report = SendSession(runtime, sink, peer.missing, put, "send:m", put_many=put_many, batch=8).run(digest)
    assert sorted(len(u) for u in uploads) == [1, 4, 8, 8] and uploads[-1] == [digest]
    assert peer.missing(source.digests()) == [] and report.chunks_wanted == 20


def test_a_session_past_its_stream_timeout_is_recorded_failed(charts: ChartRegistry, clock: ManualClock) -> None:
    from engine.streams import StreamTimeout

    runtime, source, sink, digest = setup(charts, clock)
    calls = 0

    def slow_after_three(d: str) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 4:  # the manifest and two chunks arrive, then the peer stalls past the timeout
            import time

            time.sleep(0.3)
        return source.get(d)

    with pytest.raises(StreamTimeout, match="stream_timeout of 0.2 s"):
        ReceiveSession(runtime, sink, slow_after_three, "recv:t", in_flight=1, stream_timeout=0.2).run(digest)
    assert runtime.get("recv:t").state == "failed"
    assert triggers(runtime, "recv:t")[-1] == "expire"


def test_each_acknowledged_batch_re_arms_the_per_entry_deadline(charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, sink, digest = setup(charts, clock)

    def fetch(d: str) -> bytes:
        clock.advance(4.0)  # a slow link: 4 s per chunk, 32 s per batch of 8
        return source.get(d)

    ReceiveSession(runtime, sink, fetch, "recv:slow", in_flight=1, ack_every=8, entry_timeout=45.0).run(digest)
    acks = [e for e in runtime.recorder.read(machine_id="recv:slow") if e.trigger == "ack"]
    # without re-arming, the deadline set when transferring began (45 s) would stall a 80 s transfer
    assert [(e.deadline_us or 0) - e.ts_us for e in acks] == [45_000_000] * len(acks)


def test_a_session_cut_between_create_and_offer_is_offered_on_the_next_run(
        charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, sink, digest = setup(charts, clock)
    runtime.create("stream_receive", machine_id="recv:cut", data={"peer": "server"})  # then the process died
    _, report = ReceiveSession(runtime, sink, source.get, "recv:cut").run(digest)
    assert report.chunks_wanted == 20 and not report.resumed
    assert triggers(runtime, "recv:cut") == ["create", "offer", "want", "start", "ack", "complete"]


def test_a_failed_session_is_followed_by_a_new_attempt_not_an_endless_error(
        charts: ChartRegistry, clock: ManualClock) -> None:
    runtime, source, sink, digest = setup(charts, clock)
    runtime.create("stream_receive", machine_id="recv:f", data={"peer": "server"})
    runtime.fire("recv:f", "expire", {"reason": "stream_timeout"})
    receiver = ReceiveSession(runtime, sink, source.get, "recv:f")
    _, report = receiver.run(digest)
    assert report.session_id == receiver.session_id == "recv:f~2" and report.chunks_wanted == 20
    assert runtime.get("recv:f").state == "failed" and runtime.get("recv:f~2").state == "completed"
    assert load(sink, digest).keys() == load(source, digest).keys()


def test_a_resumed_receive_fills_the_tensors_from_the_answers_and_reads_back_only_what_it_held(
        charts: ChartRegistry, clock: ManualClock) -> None:
    """How a site takes task data: a ``Filling`` gets each chunk as it arrives; only the chunks
    held before this run (acked before a cut) are read from the store."""
    from engine.tensors import Filling, Manifest

    runtime, source, sink, digest = setup(charts, clock)
    count = 0

    def dies_after_ten(d: str) -> bytes:
        nonlocal count
        count += 1
        if count > 11:
            raise Died()
        return source.get(d)

    with pytest.raises(Died):
        ReceiveSession(runtime, sink, dies_after_ten, "recv:f", in_flight=1, ack_every=4).run(digest)
    held_before = set(sink.digests())
    read_back: list[str] = []
    real_read_into = sink.read_into

    def read_into(d: str, target: Any) -> int:
        read_back.append(d)
        return real_read_into(d, target)

    fillings: list[Filling] = []

    def on_manifest(manifest: Manifest) -> Any:
        fillings.append(Filling(manifest))
        return fillings[0].fill

    put_hints: list[bool] = []
    real_put = sink.put

    def put(d: str, data: Any, **kw: Any) -> bool:
        put_hints.append(kw.get("cache", True))
        return real_put(d, data, **kw)

    sink.put = put  # type: ignore[method-assign]
    receiver = ReceiveSession(runtime, sink, source.get, "recv:f", in_flight=2, ack_every=4, cache=False)
    _, report = receiver.run(digest, on_manifest=on_manifest)
    model = fillings[0].finish(read_into)
    assert report.resumed and report.chunks_wanted == 10 and put_hints == [False] * 10
    assert read_back and set(read_back) <= held_before and len(set(read_back)) == 10  # the other 10 came filled
    expected = load(source, digest)
    assert model.keys() == expected.keys() and all(torch.equal(model[k], expected[k]) for k in expected)


def test_a_filling_puts_a_repeated_chunk_in_every_place_and_checks_lengths() -> None:
    from engine.errors import ManifestError
    from engine.tensors import Filling

    same = torch.arange(2048, dtype=torch.float32)
    packed = pack({"a": same, "b": same.clone(), "c": torch.zeros(3)}, chunk_size=4096)
    filling = Filling(packed.manifest)
    for d, data in packed.chunks.items():
        filling.fill(d, data)
    out = filling.finish(lambda d, target: pytest.fail(f"read {d} back"))  # type: ignore[arg-type, return-value]
    assert torch.equal(out["a"], same) and torch.equal(out["b"], same) and torch.equal(out["c"], torch.zeros(3))
    digest = next(iter(packed.chunks))
    with pytest.raises(ManifestError, match="has 5 bytes"):
        Filling(packed.manifest).fill(digest, b"12345")
