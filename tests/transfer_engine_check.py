"""Run by tests/test_transfer_engine.py in its own process (vLLM in-process binds the CPU
threads and memory policy of the process that hosts it): the broadcast backend through vLLM's
weight-transfer API (`actor.weight_loader = "vllm_api"`), on the real vLLM CPU engine.

A learner-side `WeightPublisher` with broadcast settings publishes versions 1 and 2 (the
embedded model's weights, perturbed with known seeds); an actor-side loop drives the weights
socket, a `WeightReceiver` and an `ApiMember` as the actor's I/O and engine threads do, and
the engine's worker joins the group and receives each version itself. Prints one JSON line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(model: str) -> None:
    import zmq
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from actors.api_member import ApiMember
    from actors.engine import Engine
    from launch.ports import free_ports
    from protocol.messages import WeightBroadcast, WeightGroupJoin
    from protocol.sockets import SocketOptions, open_socket, recv, send
    from protocol.weights import BroadcastSettings, WeightPublisher, WeightReceiver

    eng = Engine(model, max_model_len=64, max_tokens=12, temperature=1e-4, top_p=1.0, seed=0,
                 kv_cache_gib=0.25, weight_loader="vllm_api")
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    base_weights = [(n, p.detach().clone()) for n, p in hf.named_parameters()]

    def perturbed(seed: int) -> list[tuple[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [(n, (p + 0.05 * torch.randn(p.shape, generator=g)).contiguous())
                for n, p in base_weights]

    # ignore_eos: 12 tokens each, as transformers' greedy decode below produces
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    prompts = [[3, 5, 7, 4, 9], [2, 6, 6, 8], [11, 4]]

    def generate() -> list[tuple[list[int], list[float]]]:
        outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in outs]

    def hf_greedy(named) -> list[list[int]]:
        with torch.no_grad():
            for (n, p), (n2, t) in zip(hf.named_parameters(), named, strict=True):
                assert n == n2
                p.copy_(t)
            out = []
            for p in prompts:
                ids = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
                out.append(ids[0, len(p):].tolist())
            return out

    def worker_embedding() -> torch.Tensor:
        """The worker's embedding rows of the vocabulary (vLLM pads the table beyond it)."""
        vocab = hf.config.vocab_size

        def fetch(worker):
            return worker.model_runner.model.model.embed_tokens.weight[:vocab].detach().clone()
        return eng.llm.collective_rpc(fetch)[0]

    # learner side: the publisher, its broadcast thread and rendezvous
    ctx = zmq.Context()
    lsock = open_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True,
                        options=SocketOptions(sndhwm=256))
    endpoint = lsock.getsockopt(zmq.LAST_ENDPOINT).decode()
    pub = WeightPublisher(lsock, broadcast=BroadcastSettings(
        host="127.0.0.1", port=free_ports(1)[0], timeout_s=20.0, chunk_bytes=64 << 10))
    # actor side: the weights socket, receiver and member, driven as the actor's threads do
    asock = open_socket(ctx, zmq.DEALER, endpoint, bind=False,
                        options=SocketOptions(rcvtimeo_ms=10))
    receiver = WeightReceiver("a0")
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    member = ApiMember(receiver, eng, host, int(port))
    send(asock, receiver.hello())
    send(asock, member.offer())
    via_zmq: list[int] = []

    def pump_until(version: int, timeout: float = 60.0) -> float:
        """The actor's loops until `version` is applied; returns the apply seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = recv(asock)
            except zmq.Again:
                msg = None
            if isinstance(msg, WeightGroupJoin | WeightBroadcast):
                member.submit(msg)
            elif msg is not None:  # ZeroMQ chunks: the fallback path
                acks, done = receiver.handle(msg)
                for a in acks:
                    send(asock, a)
                if done is not None:
                    via_zmq.append(done[0])
                    eng.load_weights(done[1], done[0])
            applied = member.serve()  # engine thread: between steps
            while not member.outbox.empty():
                send(asock, member.outbox.get())
            for v, s in applied:
                if v == version:
                    return s
            if eng.version == version:
                return -1.0
        raise TimeoutError(f"v{version} never applied: {dict(member.counters)}, "
                           f"publisher {dict(pub.counters)}")

    deadline = time.monotonic() + 30
    while not any(p.offered for p in list(pub._peers.values())):
        assert time.monotonic() < deadline, "the actor never offered to join"
        send(asock, receiver.hello())
        send(asock, member.offer())
        time.sleep(0.05)

    out: dict = {}
    base = generate()
    w1 = perturbed(1)
    pub.publish(1, w1, chunk_bytes=1 << 20)
    out["v1_seconds"] = pump_until(1)
    api1 = generate()
    out["v1_changed_outputs"] = api1 != base
    out["v1_embedding_exact"] = torch.equal(worker_embedding(),
                                            dict(w1)["model.embed_tokens.weight"])
    # the same weights through vLLM's own in-place reload (the path the API must equal)
    worker = eng.engine.model_executor.driver_worker.worker
    worker.reload_weights(weights_iterator=iter([(n, t.clone()) for n, t in w1]))
    from actors.engine import refresh_tied_lm_head
    refresh_tied_lm_head(worker.model_runner.model)
    eng.llm.reset_prefix_cache()
    ref1 = generate()
    out["v1_tokens_equal_vllm_reload"] = [a[0] == b[0] for a, b in zip(api1, ref1, strict=True)]
    out["v1_max_dlogp_vs_vllm_reload"] = max(
        abs(x - y) for (_, la), (_, lb) in zip(api1, ref1, strict=True)
        for x, y in zip(la, lb, strict=False))
    w2 = perturbed(2)
    pub.publish(2, w2, chunk_bytes=1 << 20)
    out["v2_seconds"] = pump_until(2)
    api2 = generate()
    out["v2_changed_outputs"] = api2 != api1
    out["v2_tokens_equal_transformers"] = [a[0] == b for a, b in
                                           zip(api2, hf_greedy(w2), strict=True)]
    out["v2_embedding_exact"] = torch.equal(worker_embedding(),
                                            dict(w2)["model.embed_tokens.weight"])
    out["engine_version"] = eng.version
    out["via_zmq"] = list(via_zmq)
    out["member"] = dict(member.counters)
    out["publisher"] = {k: v for k, v in pub.counters.items()
                        if k in ("broadcasts", "groups_formed", "chunks_sent",
                                 "broadcast_failures")}
    # a broadcast for a group this worker is not in fails before the model is touched
    stray = WeightBroadcast(epoch=99, version=7, total_bytes=4, chunk_bytes=4, n_chunks=1,
                            crc32c=0, tensors=[])
    member.submit(stray)
    out["stray_applied"] = member.serve()
    out["stray_left_model"] = generate() == api2 and eng.version == 2
    out["stray_reasked_over_zmq"] = member.outbox.get_nowait().next_index == 0
    # a version that came over ZeroMQ loads through the same API (inline)
    w3 = perturbed(3)
    eng.load_weights([(n, t.clone()) for n, t in w3], 3)
    out["inline_embedding_exact"] = torch.equal(worker_embedding(),
                                                dict(w3)["model.embed_tokens.weight"])
    out["inline_tokens_equal_transformers"] = [a[0] == b for a, b in
                                               zip(generate(), hf_greedy(w3), strict=True)]
    pub.close()
    asock.close(linger=0)
    lsock.close(linger=0)
    ctx.term()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
