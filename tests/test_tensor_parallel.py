"""The plain decoder split over 2 CPU processes (gloo): every rank's gathered logits equal the unsplit decoder's,
for each architecture family (rotary GPT-J and Llama with GQA, ALiBi MPT, learned-position Cerebras-GPT)."""
import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from kfsim.parallel import shard  # noqa: E402
from test_measure_cpu import FAMILIES, generate, tiny  # noqa: E402

TP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, name, queue):
    from measure.decoder import build, slopes_of
    from measure.kv_policies import FullCache
    from measure.tensor_parallel import gather_logits, rank_slopes, shard_decoder

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        torch.manual_seed(0)
        w = tiny(name)
        full = build(w, dtype=torch.float32, device="cpu")
        part = shard_decoder(full, rank, TP)
        s = shard(w, TP)
        prompt = torch.randint(0, w.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = generate(full, w, [FullCache(2, w.n_kv_heads, 20, w.head_dim, torch.float32, "cpu", slopes_of(w))
                                      for _ in range(w.n_layers)], prompt, 4)
            caches = [FullCache(2, s.n_kv_heads, 20, s.head_dim, torch.float32, "cpu", rank_slopes(w, rank, TP))
                      for _ in range(w.n_layers)]
            logits = [gather_logits(part.prefill(prompt, caches), w.vocab_size, TP)]
            for i in range(4):
                token = logits[-1].argmax(-1)
                logits.append(gather_logits(part.decode(token, 9 + i, caches), w.vocab_size, TP))
        queue.put((rank, float((torch.stack(logits) - want).abs().max()), float(want.abs().max())))
        dist.barrier()  # no rank tears gloo down while another still talks to it (one aborted in CI, SIGABRT)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", FAMILIES)
def test_split_decoder_gives_the_unsplit_logits(name):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, name, queue)) for r in range(TP)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = sorted(queue.get(timeout=5) for _ in range(TP))
    for rank, err, scale in results:
        assert err <= 1e-4 * scale, (rank, err, scale)
