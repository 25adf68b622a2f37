"""Every SFT format of the "data people actually have" table trains correctly: each
test writes its own rows in that format, loads them as the trainer does, and checks the labels
of the trainer's encoded dataset (``engine.modalities.text.encode_dataset``) against a mask
built here from the rendered conversation: exactly the expected pieces (assistant answers and
tool calls, end-of-turn included) are trained, nothing else."""
import json

import pytest

from engine.core import config
from engine.dataset import data
from engine.modalities import text as chat
from engine.models.tokenizer import prepare_tokenizer
from engine.models.tokenizer import load_tokenizer
from engine.modalities.text import encode_dataset

# A ChatML template that renders tools the Hermes/Qwen 2.5 way: definitions in the system turn,
# calls as <tool_call>{json}</tool_call>, results as role tool.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n"
    "{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'system' %}"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def tok():
    t, _ = load_tokenizer(config.Config())
    prepare_tokenizer(t, TOOLS_TEMPLATE)
    return t


@pytest.fixture(scope="module")
def plain_tok():
    t, _ = load_tokenizer(config.Config())      # builtin:tiny's ChatML: no tools
    return t


def load_rows(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data.load(str(p))


def expected_labels(tok, row, trained):
    """The mask by hand: render the row with the template, find each expected trained piece in
    order, and keep a token's id when it has width and starts inside one of them."""
    text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    spans, pos = [], 0
    for piece in trained:
        at = text.index(piece, pos)
        spans.append((at, at + len(piece)))
        pos = at + len(piece)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [i if e > s and any(a <= s < b for a, b in spans) else chat.IGNORE
              for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return text, enc["input_ids"], labels


def check(tok, ds, trained_per_row, untrained=()):
    """The trainer's encoded rows equal the hand-built mask; ``untrained`` texts are in the first
    row but outside every trained token."""
    assert len(ds.rows) == len(trained_per_row), ds.problems
    got = encode_dataset(tok, [r.data for r in ds.rows])
    for k, (row, trained) in enumerate(zip(ds.rows, trained_per_row)):
        text, ids, labels = expected_labels(tok, row.data, trained)
        assert got[k]["input_ids"] == ids
        assert got[k]["labels"] == labels
        enc = chat.encode_batch(tok, [row.data])[0]
        shown = "".join(p for p, t in chat.segments(enc) if t)
        assert shown == "".join(trained)
        for u in untrained if k == 0 else ():
            assert u in text and u not in shown


def test_openai_tools_tool_calls_and_tool_results(tmp_path, tok):
    rows = [{"tools": [{"type": "function", "function": WEATHER}],
             "messages": [{"role": "system", "content": "You help."},
                          {"role": "user", "content": f"Weather in Paris? ({i})"},
                          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                              "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": f"sunny, {20 + i} C"},
                          {"role": "assistant", "content": f"It is sunny and {20 + i} C."}]} for i in range(3)]
    ds = load_rows(tmp_path, rows)
    assert ds.format == "messages" and not ds.problems
    assert ds.rows[0].data["tools"][0]["function"]["name"] == "get_weather"
    check(tok, ds, [[CALL, f"It is sunny and {20 + i} C.<|im_end|>"] for i in range(3)],
          untrained=["sunny, 20 C", '"description": "Weather of a city"', "You help."])


def test_openai_legacy_functions(tmp_path, tok):
    rows = [{"functions": [WEATHER],
             "messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": None,
                           "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                          {"role": "function", "name": "get_weather", "content": "rain"},
                          {"role": "assistant", "content": "It rains."}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.problems
    assert [m["role"] for m in ds.rows[0].data["messages"]] == ["user", "assistant", "tool", "assistant"]
    check(tok, ds, [[CALL, "It rains.<|im_end|>"]], untrained=["rain<|im_end|>", "Weather of a city"])


def test_sharegpt_function_call_observation_tools_column_and_system(tmp_path, tok):
    rows = [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                              "arguments": {"city": "Paris"}})},
                               {"from": "observation", "value": json.dumps({"weather": "snow"})},
                               {"from": "gpt", "value": "It snows."}],
             "tools": json.dumps([WEATHER]), "system": "Be terse."},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
             "tools": "[]", "system": "Be terse."}]
    ds = load_rows(tmp_path, rows)
    assert ds.format == "sharegpt" and not ds.problems
    first = ds.rows[0].data
    assert first["messages"][0] == {"role": "system", "content": "Be terse."}
    assert ds.rows[1].data["messages"][0]["content"] == "Be terse."
    check(tok, ds, [[CALL, "It snows.<|im_end|>"], ["Hello.<|im_end|>"]],
          untrained=['{"weather": "snow"}', "Be terse."])


def test_content_parts_openai_and_llamafactory(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                       {"type": "text", "text": "colour."}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "value": "Name a fruit."}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "Pear."}]}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.problems
    assert ds.rows[0].data["messages"][0]["content"] == "Name a colour."
    check(tok, ds, [["Blue.<|im_end|>"], ["Pear.<|im_end|>"]], untrained=["Name a colour."])


def test_content_parts_with_images_go_to_the_vision_path(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "value": "a.png"},
                                                       {"type": "text", "value": "What colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "Red."}]}]},
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "And?"}]},
                {"role": "assistant", "content": "Red."}]}]
    ds = load_rows(tmp_path, rows)
    assert ds.format == "vision" and not ds.problems, ds.problems
    assert [len(r.data["images"]) for r in ds.rows] == [1, 1]
    assert ds.rows[0].data["messages"][0]["content"][1] == {"type": "text", "text": "What colour?"}


def test_trl_conversational_prompt_completion(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
                        {"role": "user", "content": "3+3?"}],
             "completion": [{"role": "assistant", "content": "6."}], "system": "Maths."}]
    ds = load_rows(tmp_path, rows)
    assert ds.format == "prompt_completion" and not ds.problems
    assert ds.rows[0].data["messages"][0] == {"role": "system", "content": "Maths."}
    # the prompt's own assistant turn is context, not a target (TRL trains the completion only)
    check(tok, ds, [["6.<|im_end|>"]], untrained=["4.<|im_end|>", "Maths."])


@pytest.mark.parametrize("key", ["weight", "loss_weight"])
def test_per_message_weight(tmp_path, tok, plain_tok, key):
    rows = [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "bad one.", key: 0},
                          {"role": "user", "content": "b?"}, {"role": "assistant", "content": "good one.", key: 1}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.problems
    check(tok, ds, [["good one.<|im_end|>"]], untrained=["bad one."])
    check(plain_tok, ds, [["good one.<|im_end|>"]], untrained=["bad one."])     # the ChatML fast path


def test_weights_that_train_nothing_or_are_not_0_or_1_are_problems(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "x", "weight": 0}]},
            {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "x", "weight": 0.5}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.rows
    assert [(p.line, p.kind) for p in ds.problems] == [(1, "no_trained_tokens"), (2, "wrong_type")]
    assert "weight 0" in ds.problems[0].message and "0 (not trained) or 1" in ds.problems[1].message


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"instruction": "Hi", "output": "Hello."},
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]},
], ids=["messages", "sharegpt", "alpaca", "trl_conversational"])
def test_system_column_for_every_format(tmp_path, tok, row):
    ds = load_rows(tmp_path, [dict(row, system="Speak like a pirate.")])
    assert not ds.problems
    assert ds.rows[0].data["messages"][0] == {"role": "system", "content": "Speak like a pirate."}
    check(tok, ds, [["Hello.<|im_end|>"]], untrained=["Speak like a pirate."])


def test_system_column_and_a_different_system_turn_is_a_problem(tmp_path):
    ds = load_rows(tmp_path, [{"system": "A", "messages": [{"role": "system", "content": "B"},
                                                            {"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Yo"}]}])
    assert not ds.rows and "'system' column" in ds.problems[0].message


def test_template_without_tools_fails_in_one_line(tmp_path, plain_tok):
    ds = load_rows(tmp_path, [{"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sun."}]}])
    assert len(ds.rows) == 1
    with pytest.raises(data.DataError) as e:
        encode_dataset(plain_tok, [ds.rows[0].data])
    msg = str(e.value)
    assert "\n" not in msg and "does not render tool definitions" in msg and "model.chat_template" in msg


def test_bad_tool_data_is_one_problem_per_line(tmp_path):
    rows = [{"tools": "not json", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"},
                          {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
                {"function": {"name": "f", "arguments": "{oops"}}]}]},
            {"messages": [{"role": "user", "content": [{"type": "audio", "value": "x.wav"}]},
                          {"role": "assistant", "content": "b"}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.rows
    assert [p.line for p in ds.problems] == [1, 2, 3, 4]
    assert "'tools' is text but not JSON" in ds.problems[0].message
    assert "no function 'name'" in ds.problems[1].message
    assert "arguments is text but not JSON" in ds.problems[2].message
    assert "'audio'" in ds.problems[3].message


def test_preview_draws_tool_calls_results_and_weights_with_the_trainers_mask(tmp_path):
    from engine.dataset import inspect as inspect_mod
    from tui.screens.dataset import preview_text
    (tmp_path / "t.jinja").write_text(TOOLS_TEMPLATE)
    rows = [{"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look.", "weight": 0},
        {"role": "user", "content": "Please."},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "fog"}, {"role": "assistant", "content": "Foggy."}]}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = config.Config()
    cfg.data.train = str(tmp_path / "d.jsonl")
    cfg.model.chat_template = str(tmp_path / "t.jinja")
    pv = inspect_mod.preview(cfg, 0)
    assert [k for _, _, k in pv.marks] == ["weight_0", "tool_call", "tool_result"]
    segs = inspect_mod.marked_segments(pv)
    assert "".join(t for t, _, _ in segs) == pv.text
    assert [(t, tr) for t, tr, k in segs if k == "tool_call" and tr] == [(CALL, True)]
    assert not any(tr for _, tr, k in segs if k in ("tool_result", "weight_0"))
    assert any("fog" in t for t, _, k in segs if k == "tool_result")
    assert any("Let me look." in t for t, _, k in segs if k == "weight_0")
    # the marks only label the trainer's own mask
    ds = data.load(cfg.data.train)
    tok, _ = inspect_mod.tokenizer_for(cfg)
    assert pv.labels == encode_dataset(tok, [ds.rows[0].data])[0]["labels"]
    out = inspect_mod.format_preview(pv, cfg.data.max_length).split("\n", 1)[1]     # the body
    assert out.index("«weight 0: not trained»") < out.index("Let me look.") < out.index("«tool call»") \
        < out.index("⟦<tool_call>") < out.index("«tool result»") < out.index("fog") < out.index("⟦Foggy.")
    shown = preview_text(pv).plain
    assert "«tool call»" in shown and "«tool result»" in shown and "«weight 0: not trained»" in shown


def _tool_rows(n):
    return [{"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"Weather in town {i}?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": f"t{i}"}}}]},
        {"role": "tool", "content": f"rain {i}"}, {"role": "assistant", "content": f"Rain in town {i}."}]}
        for i in range(n)]


def test_a_run_on_tool_rows_trains_and_a_template_without_tools_fails_in_one_line(tmp_path, tiny_cfg):
    from engine.training import runner
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _tool_rows(24)))
    (tmp_path / "t.jinja").write_text(TOOLS_TEMPLATE)
    results = []
    for template in (str(tmp_path / "t.jinja"), ""):
        cfg = tiny_cfg.copy()
        cfg.data.train = str(tmp_path / "d.jsonl")
        cfg.model.chat_template = template
        cfg.train.max_steps, cfg.train.eval_steps, cfg.train.save_steps = 2, 2, 2
        run = runner.Run(cfg)
        run.start()
        assert run.join(timeout=300)
        results.append(run.result)
    ok, refused = results
    assert ok.type == "run_finished", getattr(ok, "reason", "")
    assert refused.type == "run_failed" and refused.kind == "data"
    assert "\n" not in refused.reason and "does not render tool definitions" in refused.reason


def test_llamafactory_v1_parts_reasoning_tool_call_and_loss_weight(tmp_path, tok):
    rows = [{"tools": json.dumps([{"type": "function", "function": WEATHER}]), "messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "I should call the tool."},
            {"type": "tool_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})}],
         "loss_weight": 1.0},
        {"role": "tool", "content": [{"type": "text", "value": "hail"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Hail."}], "loss_weight": 1.0}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.problems
    call_turn = ds.rows[0].data["messages"][1]
    assert call_turn["content"] == "<think>\nI should call the tool.\n</think>\n\n"
    assert call_turn["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    check(tok, ds, [["<think>\nI should call the tool.\n</think>\n\n" + CALL, "Hail.<|im_end|>"]],
          untrained=["hail<|im_end|>"])


@pytest.mark.parametrize("media", ["videos", "audios"])
def test_video_and_audio_rows_are_refused_not_trained_as_text(tmp_path, media):
    """LLaMA-Factory's video / audio demo rows (a '<video>' placeholder in the text and a 'videos'
    column) are problems, one line each, never text rows with the media silently dropped."""
    tag = media[:-1]
    rows = [{"messages": [{"role": "user", "content": f"<{tag}>What happens here?"},
                          {"role": "assistant", "content": f"Something {i}."}], media: [f"clip{i}.bin"]}
            for i in range(3)] + [{"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}], media: []}]
    ds = load_rows(tmp_path, rows)
    assert [r.line for r in ds.rows] == [4]
    assert [(p.line, p.kind) for p in ds.problems] == [(1, "unsupported_media"), (2, "unsupported_media"),
                                                        (3, "unsupported_media")]
    assert f"'{media}'" in ds.problems[0].message and "only text and images" in ds.problems[0].message


def test_openai_developer_role_and_refusal(tmp_path, plain_tok):
    """OpenAI's 'developer' turn is the system turn; an assistant turn with only a 'refusal' is
    trained on that refusal."""
    rows = [{"messages": [{"role": "developer", "content": "Be terse."},
                          {"role": "user", "name": "bob", "content": f"Say something bad ({i})"},
                          {"role": "assistant", "content": None, "refusal": f"I won't ({i})."}]} for i in range(2)]
    ds = load_rows(tmp_path, rows)
    assert not ds.problems and ds.rows[0].data["messages"][0] == {"role": "system", "content": "Be terse."}
    check(plain_tok, ds, [[f"I won't ({i}).<|im_end|>"] for i in range(2)], untrained=["Be terse."])


def test_tool_call_arguments_encoded_twice_are_read_once(tmp_path, tok):
    """Real files (OpenAI's cookbook drone sample) hold arguments JSON-encoded twice: the call is
    the same as with arguments encoded once."""
    twice = json.dumps(json.dumps({"city": "Paris"}))
    result = {"weather": "snow", "c": -2}                    # a tool result as an object: its JSON text
    rows = [{"tools": [{"type": "function", "function": WEATHER}],
             "messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                              "name": "get_weather", "arguments": twice}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": result},
                          {"role": "assistant", "content": "Snow."}]}]
    ds = load_rows(tmp_path, rows)
    assert not ds.problems
    assert ds.rows[0].data["messages"][2]["content"] == json.dumps(result)
    check(tok, ds, [[CALL, "Snow.<|im_end|>"]], untrained=['"weather": "snow"'])
