"""The Modelfile's TEMPLATE of every family we export renders, through Go's text/template as Ollama
executes it (tests/gotemplate.py: the subset these templates use, run on Ollama's values: its
``collate`` of the messages), the same string ``tokenizer.apply_chat_template`` gives with the
family's Jinja template, less the BOS token (llama.cpp adds BOS when it tokenises: the GGUF's
``tokenizer.ggml.add_bos_token``).

The Jinja templates below are written here in the shape of each family's published chat template
(ChatML as Qwen3 uses it and Qwen2.5 with its default system prompt, Llama 2 and Llama 3 Instruct, Gemma 2 and Gemma 3, Phi-3, Mistral v0.1, v0.3 and
Nemo): the way each places the system prompt, the BOS, the end-of-turn tokens and the spaces."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from gotemplate import GoTemplateError, ollama_values, render  # noqa: E402

from engine.models.builtin import CHATML_TEMPLATE
from engine.outputs import export

QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' "
          "or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}{{- '<|im_start|>' + "
          "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
          "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
          "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3 = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
          "messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
          "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
          "{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
          "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
          "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
          "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
        "'<|end|>\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")
MISTRAL_V1 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
              "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
              "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
              "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
              "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def _mistral(open_: str, close: str, answer: str) -> str:
    """Mistral v0.3 / Nemo: the system prompt joins the last user turn."""
    return ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
            "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
            "{%- if loop.last and system_message is defined %}"
            f"{{{{- '{open_}' + system_message + '\\n\\n' + message['content'] + '{close}' }}}}"
            f"{{%- else %}}{{{{- '{open_}' + message['content'] + '{close}' }}}}{{%- endif %}}"
            "{%- elif message['role'] == 'assistant' %}"
            f"{{{{- '{answer}' + message['content'] + eos_token }}}}{{%- endif %}}{{%- endfor %}}")


# family key of export._OLLAMA_TEMPLATES -> [(name, Jinja, bos, eos, takes a system message)]
FAMILIES = {
    "chatml": [("Qwen3 ChatML", CHATML_TEMPLATE, None, "<|im_end|>", True),
               ("Qwen2.5 (a default system prompt)", QWEN25, None, "<|im_end|>", True)],
    "llama2": [("Llama 2", LLAMA2, "<s>", "</s>", True)],
    "llama3": [("Llama 3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True)],
    "gemma": [("Gemma 2", GEMMA2, "<bos>", "<eos>", False), ("Gemma 3", GEMMA3, "<bos>", "<eos>", True)],
    "phi3": [("Phi-3", PHI3, "<s>", "<|endoftext|>", True)],
    "mistral": [("Mistral-Nemo", _mistral("[INST]", "[/INST]", ""), "<s>", "</s>", True)],
    "mistral_v3": [("Mistral v0.3", _mistral("[INST] ", "[/INST]", " "), "<s>", "</s>", True)],
    "mistral_v1": [("Mistral v0.1", MISTRAL_V1, "<s>", "</s>", False)],
}

SYSTEM = {"role": "system", "content": "You are terse."}
CHATS = [
    [{"role": "user", "content": "what is the capital of canada ?"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi, how can I help?"},
     {"role": "user", "content": "name a colour"}],
]


def _tokenizer(jinja: str, bos: str | None, eos: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from engine.models.builtin import tiny_model_dir
    base = AutoTokenizer.from_pretrained(str(tiny_model_dir()))
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token=bos, eos_token=eos)
    tok.chat_template = jinja
    return tok


def _vocab(jinja: str, stops: list[str]):
    """What modelfile_text reads of a ``gguf_write.Vocab``: the chat template and the stop tokens."""
    return type("Vocab", (), {"chat_template": jinja, "stop_tokens": stops})()


def _modelfile_template(jinja: str, eos: str) -> str:
    vocab = _vocab(jinja, [eos])
    text = export.modelfile_text("./x.gguf", vocab, system="")
    m = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert m, text
    assert f"PARAMETER stop {eos!r}".replace("'", '"') in text
    return m.group(1)


def test_every_ollama_template_is_covered():
    assert set(FAMILIES) == set(export._OLLAMA_TEMPLATES)


@pytest.mark.parametrize("family,name,jinja,bos,eos,system",
                         [(f, *case) for f, cases in FAMILIES.items() for case in cases],
                         ids=[case[0] for cases in FAMILIES.values() for case in cases])
def test_modelfile_template_renders_as_apply_chat_template(family, name, jinja, bos, eos, system):
    assert export.template_family(jinja) == family
    go = _modelfile_template(jinja, eos)
    assert go == export.ollama_template(jinja) and export._OLLAMA_TEMPLATES[family] in go
    tok = _tokenizer(jinja, bos, eos)
    chats = CHATS + ([[SYSTEM] + c for c in CHATS] if system else [])
    for chat in chats:
        want = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if bos and want.startswith(bos):
            want = want[len(bos):]
        got = render(go, ollama_values(chat))
        assert got == want, f"{name}: {chat}"
    if not system:      # the family's Jinja refuses a system message; Ollama's render still places it
        with pytest.raises(Exception):
            tok.apply_chat_template([SYSTEM] + CHATS[0], tokenize=False, add_generation_prompt=True)
        assert SYSTEM["content"] in render(go, ollama_values([SYSTEM] + CHATS[0]))


def test_an_unknown_template_gets_no_template_and_one_stated_line():
    vocab_like = _vocab("{% for m in messages %}### {{ m['content'] }}{% endfor %}", [])
    line = export.template_warning(vocab_like)
    assert line.startswith("the Modelfile has no TEMPLATE") and "\n" not in line
    text = export.modelfile_text("./x.gguf", vocab_like, system="")
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and f"# {line}" in text
    assert export.template_warning(_vocab(CHATML_TEMPLATE, [])) == ""


def test_the_go_interpreter_refuses_what_it_does_not_know():
    """A construct outside its subset fails the test instead of rendering a guess."""
    with pytest.raises(GoTemplateError):
        render("{{ .Content | printf }}", {"Content": "x"})
    with pytest.raises(GoTemplateError):
        render("{{ template \"x\" }}", {})
    assert render("{{- if eq .A \"a\" }}A{{ else if .B }}B{{ else }}C{{ end -}}  ", {"A": "z", "B": ""}) == "C"
    assert render("{{ $x := 1 }}{{ range .L }}{{ $x = . }}{{ end }}{{ $x }}", {"L": [2, 3]}) == "3"
    assert render("{{ len (slice .L 1) }} {{ len (slice .L 1 2) }} {{ index .L 2 }}", {"L": [4, 5, 6]}) == "2 1 6"
