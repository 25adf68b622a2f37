"""Writes engine/assets/sample_chat.jsonl: the bundled ChatML demo dataset (300 rows).

Small, deterministic and written by us: short assistant answers in a consistent style, so
a tiny model visibly learns them in a minute on a CPU. Re-run to regenerate:
    python examples/make_sample_data.py
"""
import json
import random
from pathlib import Path

SYSTEM = "You are a concise assistant for people fine-tuning language models."

FACTS = [
    ("What does QLoRA quantize?", "QLoRA quantizes the frozen base model to 4-bit NF4 and trains LoRA adapters in 16-bit on top."),
    ("What is a good starting LoRA rank?", "Start with rank 32 and alpha 64; raise the rank if the loss plateaus."),
    ("What learning rate should I use for QLoRA?", "Start at 2e-4. If the loss turns NaN, drop it to 1e-4."),
    ("How do I compute the effective batch size?", "Multiply the micro-batch size by the gradient accumulation steps and the number of GPUs."),
    ("What does gradient checkpointing do?", "It recomputes activations in the backward pass, trading about a third more compute for much less memory."),
    ("Why did my run run out of memory at the start?", "The sequence length is too high for the GPU. Lower max_length or enable packing."),
    ("What does a U-shaped eval loss mean?", "The model is overfitting. Add dropout 0.05 or train fewer epochs."),
    ("What should GPU utilisation be during training?", "Between 80 and 95 percent; lower means a bottleneck such as data loading."),
    ("How do I deploy a LoRA adapter?", "Merge it into a 16-bit copy of the base, or serve it next to the base with vLLM's multi-LoRA support."),
    ("What is DoRA?", "DoRA splits each weight into magnitude and direction and trains the direction with LoRA."),
    ("What is LoRA-FA?", "LoRA-FA freezes the A matrix and trains only B, halving the trainable parameters."),
    ("How many examples do I need?", "Five hundred to five thousand high-quality examples beat fifty thousand noisy ones."),
    ("What is NF4?", "NF4 is a 4-bit data type whose levels follow a normal distribution, matching how weights are spread."),
    ("What does double quantization save?", "It quantizes the quantization constants too, saving about 0.4 bits per parameter."),
    ("Which modules should LoRA target?", "All linear projections: q, k, v, o, gate, up and down."),
    ("Why are my outputs garbage after merging?", "The target modules did not match the architecture. Check them against the model's layer names."),
    ("What does packing do?", "Packing puts several short rows into one sequence so no compute is spent on padding."),
    ("What does the label mask do?", "It marks which tokens the loss trains on; for chat data, only the assistant's answers."),
    ("Why does my model never stop talking?", "The end-of-turn token was outside the loss mask, so the model never learned to stop."),
    ("What does a paged optimizer do?", "It moves optimizer state to CPU memory when the GPU runs short, avoiding out-of-memory spikes."),
]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("India", "New Delhi"),
            ("Chile", "Santiago"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Ghana", "Accra"),
            ("Poland", "Warsaw"), ("Vietnam", "Hanoi"), ("Mexico", "Mexico City")]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


def rows(rng: random.Random):
    out = []
    for q, a in FACTS:
        for phr in (q, q.lower(), "Quick question: " + q[0].lower() + q[1:], "Explain briefly. " + q):
            out.append([("user", phr), ("assistant", a)])
    for country, capital in CAPITALS:
        for phr in (f"What is the capital of {country}?", f"Name the capital city of {country}.",
                    f"capital of {country}?"):
            out.append([("user", phr), ("assistant", f"The capital of {country} is {capital}.")])
    while len(out) < 260:
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op = rng.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append([("user", f"What is {a} {op} {b}?"), ("assistant", f"{a} {op} {b} = {val}.")])
    while len(out) < 300:
        c1, c2 = rng.sample(COLORS, 2)
        out.append([("user", f"I like {c1}. What colour do I like?"), ("assistant", f"You like {c1}."),
                    ("user", f"And if I said {c2} instead?"), ("assistant", f"Then you would like {c2}.")])
    rng.shuffle(out)
    return out


def main():
    rng = random.Random(7)
    path = Path(__file__).resolve().parents[1] / "engine" / "assets" / "sample_chat.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, turns in enumerate(rows(rng)):
            msgs = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
            msgs += [{"role": r, "content": c} for r, c in turns]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
