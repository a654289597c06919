"""`prefixserve train` and `prefixserve evaluate` (also runnable as `python -m trainer.cli`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from prefix_store.base import InvalidTaskName, validate_task_name
from trainer.methods import METHODS, MethodConfig
from trainer.push import API_KEY_ENV, PushError, check_push, push_prefix


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a task prefix (or a baseline) on a data set")
    p.add_argument("--method", choices=METHODS, default="prefix")
    p.add_argument("--model", default="embedded", help="embedded, a local directory or a hub id")
    p.add_argument("--data", required=True, help="e2e or webnlg (read from $PREFIXSERVE_DATA_DIR, default "
                   "../shared/data beside the repository; see docs/trainer.md#data), or a JSONL/CSV file with "
                   "input and output columns")
    p.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--prefix-length", type=int, default=10,
                   help="prefix length (BART: of the decoder self-attention prefix; 0 leaves it out)")
    p.add_argument("--encoder-prefix-length", type=int, default=None,
                   help="BART: encoder self-attention prefix length (default --prefix-length; 0 leaves it out)")
    p.add_argument("--cross-prefix-length", type=int, default=None,
                   help="BART: cross-attention prefix length (default --prefix-length; 0 leaves it out)")
    p.add_argument("--mid-dim", type=int, default=512, help="reparametrisation MLP width (paper: 512; 800 for "
                   "BART summarisation)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--init", choices=("random", "words"), default="random")
    p.add_argument("--init-text", default="table-to-text:")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--max-train", type=int, default=0, help="subsample this many training pairs (seeded)")
    p.add_argument("--max-valid", type=int, default=200, help="validation pairs (a seeded subsample; 0: all)")
    p.add_argument("--log-every", type=int, default=10, help="log the training loss every N steps")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fix-mrs", action="store_true", help="E2E: reduce each training MR to the attributes its "
                   "reference expresses; drop pairs whose reference states wrong or extra values")
    p.add_argument("--swap-values", action="store_true", help="E2E: each epoch, draw every pair's venue type and "
                   "food from the E2E ontology and rewrite its MR and text to match")
    p.add_argument("--device", default="cpu")
    p.add_argument("--push", metavar="URL", help="upload the prefix (--method lora: the LoRA adapter) to a running "
                   "server (needs --task)")
    p.add_argument("--task", help="the task name on the server")
    p.add_argument("--api-key", default=None, help="the server's API key for --push, when auth is on (default: "
                   "env PREFIXSERVE_API_KEY, as prefixctl)")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="decode a data split and score it (BLEU, NIST, METEOR, ROUGE-L, CIDEr)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", required=True, help="as for train: e2e, webnlg or a JSONL/CSV file")
    p.add_argument("--split", choices=("test", "valid"), default="test")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prefix", help="native prefix artifact directory, or a training run directory")
    src.add_argument("--lora", help="a LoRA adapter directory (run_dir/lora)")
    src.add_argument("--finetuned", help="a fine-tuned model directory (run_dir/model)")
    p.add_argument("--shots", type=int, default=0, help="untuned model: number of training examples in the prompt")
    p.add_argument("--instruction", default=None, help="untuned model: task description (default: a built-in one)")
    p.add_argument("--beams", type=int, default=5, help="1 = greedy (decoded by the server's engine, batched)")
    p.add_argument("--max-batch-size", type=int, default=64,
                   help="rows decoded at once: greedy, the engine's batch; beam search, the inputs whose beams "
                        "share each step are this // beams")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-inputs", type=int, default=0, help="score a seeded random subset of distinct inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantization", choices=("none", "q4"), default="none",
                   help="none: the exact fp32 mode; q4: decode as the server's quantised mode does (the embedded "
                        "model's 4-bit GGUF weights through the server's kernels; greedy; a prefix, a LoRA adapter "
                        "or no task)")
    p.add_argument("--must-include", action="store_true", help="E2E, greedy: each output must say a phrase for "
                   "every attribute of its MR before it may stop (the server's parameters.must_include)")
    p.add_argument("--swap-values", action="store_true", help="E2E: score the split with each MR's venue type and "
                   "food swapped as training's validation pairs are (references rewritten to match)")
    p.add_argument("--out", help="write predictions.jsonl and metrics.json here")
    p.set_defaults(func=cmd_evaluate)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `evaluate` subcommands to the prefixserve CLI."""
    _add_train(subparsers)
    _add_evaluate(subparsers)


def cmd_train(args: argparse.Namespace) -> int:
    """Run `prefixserve train`."""
    from basemodel.model import load_model
    from trainer.data import load_data
    from trainer.loop import TrainConfig, train

    if args.push and not args.task:
        print("--push needs --task NAME", file=sys.stderr)
        return 2
    if args.push and args.method == "finetune":
        print("--push: --method finetune makes a whole model; the server serves prefixes and LoRA adapters",
              file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.push:  # a wrong URL, key or name is found now, not after the training
        try:
            validate_task_name(args.task)
            check_push(args.push, api_key)
        except (InvalidTaskName, PushError) as e:
            print(f"prefixserve: cannot push: {e}", file=sys.stderr)
            return 2
    mcfg = MethodConfig(method=args.method, prefix_length=args.prefix_length,
                        encoder_prefix_length=args.encoder_prefix_length, cross_prefix_length=args.cross_prefix_length,
                        mid_dim=args.mid_dim, dropout=args.dropout, init=args.init, init_text=args.init_text)
    cfg = TrainConfig(method=mcfg, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                      batch_size=args.batch_size, warmup_steps=args.warmup_steps, max_len=args.max_len,
                      max_train=args.max_train, max_valid=args.max_valid, log_every=args.log_every,
                      eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                      fix_mrs=args.fix_mrs, swap_values=args.swap_values)
    data = load_data(args.data, seed=args.seed)  # before the model: a missing data set is told at once
    loaded = load_model(args.model, device=args.device, dtype="float32")
    s = train(loaded, data, cfg, args.out)
    s["command"] = "prefixserve " + shlex.join(sys.argv[1:])  # as typed (python -m trainer.cli: the same)
    (Path(args.out) / "summary.json").write_text(json.dumps(s, indent=1))
    print(f"trainable parameters: {s['trained_params']:,} ({100 * s['trained_share']:.4f}% of "
          f"{s['base_params']:,}); stored in the artifact: {s['stored_params']:,} ({100 * s['stored_share']:.4f}%)")
    print(f"{s['steps']} steps in {s['train_seconds']:.0f} s; outputs in {args.out}")
    if args.push:
        what = Path(args.out) / ("lora" if args.method == "lora" else "prefix")  # trainer/loop.py's save_outputs
        # a native artifact carries its own description; a PEFT adapter's is sent beside it
        description = (f"lora on {data.name} ({s['steps']} steps, batch {args.batch_size}, lr {args.lr}, seed "
                       f"{args.seed}) for {loaded.name}") if args.method == "lora" else ""
        try:
            print(json.dumps(push_prefix(what, args.push, args.task, api_key, description=description)))
        except PushError as e:
            print(f"prefixserve: push failed: {e}\nthe {what.name} is in {what}; upload it with "
                  f"PUT /prefixes/{args.task} (README)", file=sys.stderr)
            return 2
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run `prefixserve evaluate`."""
    import torch

    from basemodel.model import load_model
    from trainer.data import load_data
    from trainer.evaluate import DEFAULT_INSTRUCTION, evaluate, load_prefix

    if args.quantization == "q4":
        if args.finetuned or args.beams != 1:
            raise SystemExit("--quantization q4 decodes greedily (--beams 1) with a prefix, a LoRA adapter or no "
                             "task, on the base model's quantised weights: it does not take --finetuned")
        from server.engine.quant_runner import load_quantized

        loaded = load_quantized(args.model)
    else:
        loaded = load_model(args.finetuned or args.model, device=args.device, dtype="float32")
    if args.finetuned:  # the fine-tuned weights; keep the tokenizer of the base model when the run saved none
        base = load_model(args.model, device=args.device, dtype="float32") if loaded.tokenizer is None else loaded
        loaded.tokenizer = base.tokenizer
    model, kv = loaded.model, None
    if args.prefix:
        kv = load_prefix(args.prefix, loaded)
    elif args.lora and loaded.quantization == "q4":  # served as the server serves it: a LoRA row, not merged
        from trainer.evaluate import load_lora

        kv = load_lora(args.lora, loaded)
    elif args.lora:
        from peft import PeftModel

        # merged into the weights: the same function (up to fp32 rounding), decodable by the engine
        model = loaded.model = PeftModel.from_pretrained(loaded.model, args.lora).merge_and_unload()
    data = load_data(args.data, seed=args.seed)
    examples = data.test if args.split == "test" else data.valid
    if args.swap_values:
        from trainer.e2e_data import swap_values

        examples = [swap_values(e, -1 - args.seed, unstated_keep=False) for e in examples]
    untuned = not (args.prefix or args.lora or args.finetuned)
    instruction = args.instruction if args.instruction is not None else (DEFAULT_INSTRUCTION if untuned else "")
    shots = data.train[:: max(1, len(data.train) // max(args.shots, 1))][:args.shots] if args.shots else []
    threads = torch.get_num_threads()
    if loaded.quantization == "q4":  # the kernels run on threads of their own (as in the server): torch's would spin
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            r = evaluate(loaded, model, kv, examples, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                         max_inputs=args.max_inputs, seed=args.seed, shots=shots, instruction=instruction,
                         out=args.out, max_batch_size=args.max_batch_size, must_include=args.must_include)
    finally:
        torch.set_num_threads(threads)
    print(json.dumps(r, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m trainer.cli train|evaluate ...`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="prefixserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
