"""Ktgen under concurrency.

- Python threads running forward_train/backward on different MoE objects at once (cffi
  releases the GIL in every kernel call, so the kernels really overlap) give bitwise the
  results each object gives alone.
- A thread running forwards while another thread calls set_lora on a different MoE object of
  the same spec (the same loaded kernel module): every result is the right one, bitwise.

Two processes compiling one new spec into one empty cache at once is
test_compile.py::test_two_processes_build_the_same_new_spec.
"""

from __future__ import annotations

import threading

import numpy as np

import ktgen
from helpers import LORA_NAMES, make_inputs, make_weights, rel_spec

N_THREADS = 4
STEPS = 12


def build(spec, seed):
    rng = np.random.default_rng(seed)
    lora = ktgen.LoRAWeights.random(spec, rng, 0.1)
    return ktgen.MoE(spec, *make_weights(spec, rng, 0.5), lora)


def bits(a):
    """A copy of an array's raw bytes, for bitwise comparison."""
    return None if a is None else np.ascontiguousarray(a).view(np.uint8).copy()


def train_steps(moe, seed):
    """STEPS forward_train/backward steps of varying T; every output's bits."""
    rng = np.random.default_rng(seed)
    results = []
    for step in range(STEPS):
        T = int(rng.integers(0, moe.spec.max_len + 1))
        x, ids, rw = make_inputs(moe.spec, rng, T, std=1.0)
        go = make_inputs(moe.spec, rng, T)[0]
        out, saved = moe.forward_train(x, ids, rw)
        g = moe.backward(saved, go)
        results.append([bits(out), bits(g.input), bits(g.routing_weights)]
                       + [bits(getattr(g, n)) for n in LORA_NAMES])
    return results


def same(a, b):
    return all((x is None and y is None) or np.array_equal(x, y) for x, y in zip(a, b))


def run_threads(targets):
    """Run the callables in threads started together; re-raise the first exception."""
    barrier = threading.Barrier(len(targets))
    errors, results = [], [None] * len(targets)

    def wrap(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def test_threads_on_different_moes_match_single_threaded_bitwise():
    # two objects of each of two specs (tp 1 and tp 2), each with its own weights and data
    moes = [build(rel_spec(1 + i % 2), seed=i) for i in range(N_THREADS)]
    alone = [train_steps(m, seed=100 + i) for i, m in enumerate(moes)]
    for _ in range(2):
        together = run_threads([lambda m=m, i=i: train_steps(m, seed=100 + i)
                                for i, m in enumerate(moes)])
        for i in range(N_THREADS):
            for step, (a, b) in enumerate(zip(alone[i], together[i])):
                assert same(a, b), f"MoE {i} step {step} differs when run beside other threads"
    for m in moes:
        m.close()


def test_forwards_while_another_moe_swaps_lora():
    spec = rel_spec(1)
    reader, swapper = build(spec, seed=7), build(spec, seed=8)
    rng = np.random.default_rng(9)
    lora_a = ktgen.LoRAWeights.random(spec, rng, 0.1)
    lora_b = ktgen.LoRAWeights.random(spec, rng, 0.3)
    x, ids, rw = make_inputs(spec, rng, spec.max_len)

    expected_reader = bits(reader.forward(x, ids, rw))
    expected = {}
    for name, lw in (("a", lora_a), ("b", lora_b)):
        swapper.set_lora(lw)
        expected[name] = bits(swapper.forward(x, ids, rw))
    assert not np.array_equal(expected["a"], expected["b"])
    rounds = 1000

    def read():
        for i in range(rounds):
            assert np.array_equal(bits(reader.forward(x, ids, rw)), expected_reader), f"round {i}"
        return rounds

    def swap():
        for i in range(rounds):
            name, lw = ("a", lora_a) if i % 2 else ("b", lora_b)
            swapper.set_lora(lw)
            assert np.array_equal(bits(swapper.forward(x, ids, rw)), expected[name]), f"round {i}"
        return rounds

    assert run_threads([read, swap]) == [rounds, rounds]
