"""Token parity: engine-stored blocks checked against the router's blocks for the requests it
routed; a wrong chat template is caught against a real emulated pod."""

from __future__ import annotations

import asyncio
import random
import shutil
import time

import aiohttp

from policies.kv.events import BlockStored
from policies.kv.hashing import BlockHasher, Namespace
from router.app import create_app, serve
from router.config import parse_config
from router.kv.metrics import KvMetrics
from router.kv.parity import TokenParity
from router.setup.kv import build_kv
from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

BS = 4
H = BlockHasher(Namespace("m"), BS)


def _stored(tokens, parent=None):
    n = len(tokens) // BS
    return BlockStored(tuple(range(1000, 1000 + n)), parent, tuple(tokens), BS)


def test_shared_prefix_requests_are_not_mismatches():
    parity = TokenParity(KvMetrics())
    parity.watch("pod")
    a = [*range(12), 50, 51, 52, 53]
    b = [*range(12), 60, 61, 62, 63]
    parity.note("a", "m", H.hash_tokens(a))
    parity.note("b", "m", H.hash_tokens(b))
    parity.dispatched("a", "pod", 0.0)
    parity.dispatched("b", "pod", 0.0)
    parity.observe("pod", _stored(a), H.hash_tokens(a), 1.0)
    # b's prefix was cached by a: the engine stores only its last block, chained to a's.
    parity.observe("pod", _stored(b[12:], parent=1002), H.extend(H.hash_tokens(b)[2], b[12:]),
                   1.0)
    assert parity.checked_blocks == 4 and parity.mismatched_blocks == 0


def test_wrong_blocks_are_mismatches_and_expire():
    parity = TokenParity(KvMetrics(), ttl_s=10.0)
    parity.watch("pod")
    routed = list(range(16))
    engine = [1, *routed[:-1]]  # the engine saw a BOS the router did not render
    parity.note("r", "m", H.hash_tokens(routed))
    parity.dispatched("r", "pod", 0.0)
    parity.observe("pod", _stored(engine), H.hash_tokens(engine), 1.0)
    assert parity.mismatched_blocks == 1  # the first block; later ones have unknown parents
    parity.observe("pod", _stored(engine), H.hash_tokens(engine), 20.0)  # expired: no evidence
    assert parity.checked_blocks == 1
    value = parity.metrics.registry.get_sample_value
    assert value("kvrouter_token_parity_mismatch_total", {"model": "m"}) == 1


async def test_wrong_chat_template_is_caught_against_an_emulated_pod(tmp_path):
    wrong = tmp_path / "tokenizer"
    shutil.copytree(default_path(), wrong)
    template = (wrong / "chat_template.jinja").read_text()
    # A template that differs subtly (a space after each role header) from the engine's.
    (wrong / "chat_template.jinja").write_text(template.replace("{{ message['role'] }}\n",
                                                                "{{ message['role'] }} \n"))
    async with EmulatedCluster(count=1, model="tiny-llama", block_size=16, time_scale=20.0,
                               tokenizer=default_path()) as cluster:
        config = parse_config({
            "backends": [{"url": cluster.urls[0]}],
            "policy": {"name": "kv_aware", "seed": 1},
            "models": {"tiny-llama": {"tokenizer": str(wrong), "block_size": 16}},
            "kv_events": {"scrape_interval_s": 0.2, "discover_interval_s": 0.2},
        })
        kv = build_kv(config)
        rng = random.Random(1)
        app = create_app(config, analyzer=kv.analyzer, index=kv.index, policy=kv.policy(rng),
                         rng=rng, background=[kv.background])
        runner, port = await serve(app, "127.0.0.1", 0)
        try:
            deadline = time.monotonic() + 30
            while not all(b.kv_events for b in app.state.pool):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as session:
                for i in range(3):
                    body = {"model": "tiny-llama", "max_tokens": 2, "messages": [
                        {"role": "user", "content": f"request {i} " + "cache words " * 60}]}
                    async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                            json=body) as r:
                        assert r.status == 200
                deadline = time.monotonic() + 30
                while kv.parity.mismatched_blocks == 0:
                    assert time.monotonic() < deadline, "the mismatch was never detected"
                    await asyncio.sleep(0.05)
                async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                    text = await r.text()
            assert 'kvrouter_token_parity_mismatch_total{model="tiny-llama"}' in text
        finally:
            await runner.cleanup()


def test_only_watched_backends_keep_expectations():
    # A backend whose events are not subscribed can never be checked: nothing is kept for it,
    # and with no backend watched the analyzer's notes are not kept either.
    parity = TokenParity(KvMetrics())
    tokens = list(range(32))
    parity.note("r", "m", H.hash_tokens(tokens))
    parity.dispatched("r", "pod", 0.0)
    parity.watch("pod")
    parity.dispatched("r", "pod", 0.0)
    parity.observe("pod", _stored([1, *tokens[:-1]]), H.hash_tokens([1, *tokens[:-1]]), 1.0)
    assert parity.checked_blocks == 0  # no note was kept while nothing was watched
    parity.note("r", "m", H.hash_tokens(tokens))
    parity.dispatched("r", "other", 0.0)  # not watched
    parity.observe("other", _stored(tokens), H.hash_tokens(tokens), 1.0)
    assert parity.checked_blocks == 0
    parity.dispatched("r", "pod", 0.0)
    parity.observe("pod", _stored([1, *tokens[:-1]]), H.hash_tokens([1, *tokens[:-1]]), 1.0)
    assert parity.checked_blocks == 1 and parity.mismatched_blocks == 1
    parity.remove_backend("pod")  # unhealthy: forgotten and no longer watched
    parity.dispatched("r", "pod", 2.0)
    parity.observe("pod", _stored([1, *tokens[:-1]]), H.hash_tokens([1, *tokens[:-1]]), 3.0)
    assert parity.checked_blocks == 1
