"""Fine-tune a Hugging Face MoE model's experts with LoRA on ktgen's kernels, end to end.

    python examples/finetune_hf.py [--steps 60] [--out DIR]

1. A tiny Qwen3-MoE is built from a config and saved as a checkpoint directory (a stand-in
   for a real one such as Qwen/Qwen3-30B-A3B).
2. The model is built empty from its config and patched from the checkpoint directory with
   `ktgen.torch.patch_model(model, checkpoint=DIR)`: every MoE experts module runs on ktgen,
   its experts packed straight from the checkpoint's files, the other weights read after;
   every base weight is frozen, only the experts' LoRA trains (PEFT's default r=8,
   lora_alpha=8).
3. transformers' `Trainer` trains it on a toy task (count up by 5 modulo 64).
4. The adapter is saved in PEFT's format (`ktgen.torch.save_adapter`), loaded back with plain
   PEFT on the unpatched model, and both generate from the same prompt.

Runs in well under a minute on two cores. `main()` returns a dict of the figures.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch

VOCAB, STEP, SEQ, PROMPT = 64, 5, 24, 6


class CountData(torch.utils.data.Dataset):
    """Sequences that count up by STEP modulo VOCAB from a random start: the next token is a
    function of the current one, which the experts' LoRA can learn."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            start = int(torch.randint(0, VOCAB, (1,), generator=g))
            ids = (start + STEP * torch.arange(SEQ)) % VOCAB
            self.items.append({"input_ids": ids, "labels": ids.clone()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def build_checkpoint(directory: Path) -> None:
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, intermediate_size=64, max_position_embeddings=64,
        norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():   # a base model with some signal in it, bf16 weights
            p.copy_((torch.randn(p.shape) * 0.1).bfloat16().float())
    model.save_pretrained(str(directory))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import accelerate
    import peft
    import transformers
    from ktgen.torch import patch_model, save_adapter

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
    say = (lambda *a: None) if args.quiet else print
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(tmp.name) if tmp else args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        build_checkpoint(out / "base")
        # Built empty (no weights in memory), then patched from disk: the experts are packed
        # straight from the checkpoint's files one layer at a time, the rest is read after.
        config = transformers.AutoConfig.from_pretrained(str(out / "base"))
        with accelerate.init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config)
        report = patch_model(model, checkpoint=out / "base", max_len=SEQ * 8, progress=not args.quiet)
        say(report)

        targs = transformers.TrainingArguments(
            output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
            learning_rate=3e-2, lr_scheduler_type="constant", logging_steps=10, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=args.quiet, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=targs, train_dataset=CountData(256))
        if args.quiet:
            logging.getLogger("transformers").setLevel(logging.ERROR)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        say("training loss every 10 steps:", [round(v, 3) for v in losses])

        save_adapter(model, out / "adapter", base_model_name_or_path=str(out / "base"))

        # Plain PEFT, no ktgen: the unpatched base model with the adapter.
        base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"))
        reference = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        model.eval()
        prompt = CountData(1, seed=99)[0]["input_ids"][:PROMPT][None]
        with torch.no_grad():
            ours = model.generate(prompt, max_new_tokens=PROMPT, do_sample=False)
            theirs = reference.generate(input_ids=prompt, max_new_tokens=PROMPT, do_sample=False)
            x = CountData(4, seed=7)[0]["input_ids"][None]
            a, b = model(x).logits.double(), reference(input_ids=x).logits.double()
        rel = float((a - b).norm() / b.norm())
        same = int((ours == theirs).sum()) - prompt.shape[1]
        say(f"ktgen vs PEFT: logits relL2 {rel:.2e}; generated tokens identical: "
            f"{same}/{ours.shape[1] - prompt.shape[1]}")
        say("prompt   ", prompt[0].tolist())
        say("ktgen    ", ours[0, prompt.shape[1]:].tolist())
        say("PEFT     ", theirs[0, prompt.shape[1]:].tolist())
        return {"losses": losses, "logits_rel_l2": rel, "generated": ours[0].tolist(),
                "generated_peft": theirs[0].tolist(), "report": report}
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
