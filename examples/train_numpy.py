"""Fit the LoRA adapters of one MoE layer to a target with Adam, in NumPy only.

A "teacher" layer (the same frozen base weights plus random LoRA adapters) produces the
targets; the "student" starts from PEFT's initialisation (A random, B zero) and learns its
adapters from ktgen's gradients. The optimizer updates the arrays in place, which the
kernels read directly: no call is needed to hand the new values to ktgen.

    python examples/train_numpy.py [--steps 300]
"""

from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

import ktgen

bf16 = ml_dtypes.bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    spec = ktgen.MoESpec(name="train_demo", expert_num=8, num_experts_per_tok=2, hidden_size=64,
                         intermediate_size=128, max_len=args.tokens, lora={"rank": 4, "alpha": 8.0})
    rng = np.random.default_rng(0)
    E, H, I = spec.expert_num, spec.hidden_size, spec.intermediate_size
    gate, up, down = ((rng.standard_normal(s, np.float32) * 0.1).astype(bf16)
                      for s in ((E, I, H), (E, I, H), (E, H, I)))

    teacher = ktgen.MoE(spec, gate, up, down, ktgen.LoRAWeights.random(spec, rng, std=0.1))
    student_lora = ktgen.LoRAWeights.random(spec, rng, std=0.1)
    for name in ("gate_b", "up_b", "down_b"):
        getattr(student_lora, name)[...] = 0  # PEFT starts B at zero: the student starts as the base
    student = ktgen.MoE(spec, gate, up, down, student_lora)

    # Adam state per LoRA matrix.
    params = {n: getattr(student_lora, n) for n in ktgen.runtime.LORA_NAMES}
    m = {n: np.zeros_like(p) for n, p in params.items()}
    v = {n: np.zeros_like(p) for n, p in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    T, k = args.tokens, spec.num_experts_per_tok
    for step in range(1, args.steps + 1):
        x = rng.standard_normal((T, H), np.float32).astype(bf16)
        logits = rng.standard_normal((T, E))
        ids = np.ascontiguousarray(np.argsort(-logits, axis=1)[:, :k])
        top = np.take_along_axis(logits, ids, 1)
        weights = (np.exp(top) / np.exp(top).sum(1, keepdims=True)).astype(np.float32)

        target = teacher.forward(x, ids, weights).astype(np.float32)
        out, saved = student.forward_train(x, ids, weights)
        diff = out.astype(np.float32) - target
        loss = float(np.mean(diff**2))
        grads = student.backward(saved, (2.0 * diff / diff.size).astype(bf16))

        for n, p in params.items():
            g = getattr(grads, n)
            m[n] = beta1 * m[n] + (1 - beta1) * g
            v[n] = beta2 * v[n] + (1 - beta2) * g * g
            mhat = m[n] / (1 - beta1**step)
            vhat = v[n] / (1 - beta2**step)
            p -= args.lr * mhat / (np.sqrt(vhat) + eps)  # in place: the kernel sees it next step

        if step == 1 or step % 25 == 0:
            print(f"step {step:4d}  loss {loss:.6f}", flush=True)


if __name__ == "__main__":
    main()
