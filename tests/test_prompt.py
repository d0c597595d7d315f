"""Chat templates of popular GGUFs, rendered by the project's own renderer with histories that used to break them.

Each template below is the model's real ``tokenizer.chat_template`` text (as in its HF tokenizer_config.json and
the GGUF made from it), copied from a public copy named beside it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.engine import Engine
from bot.errors import LlamarelayError, PromptError
from bot.prompt import CHATML_TEMPLATE, TURN_SEPARATOR, ChatTemplate, alternate_roles

# teknium/OpenHermes-2.5-Mistral-7B: plain ChatML (copied from ollama template/index.json).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct (copied from ollama template/index.json).
LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct (copied from ollama template/index.json).
LLAMA_3_1 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.1 (copied from ollama template/index.json; the same text is in
# llama-cpp-python's llama_chat_format.py). No system role, strict alternation.
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)

# mistralai/Mistral-Nemo-Instruct-2407, the v0.3-style template: optional system message, then strict
# alternation (copied from llama.cpp models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja).
MISTRAL_NEMO = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# google/gemma-2-2b-it: rejects a system role, strict alternation
# (copied from llama.cpp models/templates/google-gemma-2-2b-it.jinja).
GEMMA_2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-4b-it (also 1b/12b/27b): folds the system prompt itself, strict alternation
# (copied from the gemma-3 tokenizer_config.json text as quoted in public fine-tuning code).
GEMMA_3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# Qwen/Qwen2.5-7B-Instruct (the whole Qwen2.5 Instruct family; copied from a Swift test fixture quoting it).
QWEN_2_5 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-0.6B (the Qwen3 family; copied from llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja).
QWEN_3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# microsoft/Phi-3-mini-4k-instruct: renders no system turn at all, silently (copied from ollama
# template/index.json).
PHI_3_MINI = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == "
    "'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)


class Model(NamedTuple):
    source: str
    bos_token: str = ""
    eos_token: str = ""


MODELS = {
    "chatml": Model(CHATML),
    "llama-3": Model(LLAMA_3, "<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.1": Model(LLAMA_3_1, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.1": Model(MISTRAL_V01, "<s>", "</s>"),
    "mistral-nemo": Model(MISTRAL_NEMO, "<s>", "</s>"),
    "gemma-2": Model(GEMMA_2, "<bos>", "<eos>"),
    "gemma-3": Model(GEMMA_3, "<bos>", "<eos>"),
    "qwen-2.5": Model(QWEN_2_5, "", "<|im_end|>"),
    "qwen-3": Model(QWEN_3, "", "<|im_end|>"),
    "phi-3-mini": Model(PHI_3_MINI, "<s>", "<|endoftext|>"),
}


def template(name: str) -> ChatTemplate:
    model = MODELS[name]
    return ChatTemplate(model.source, bos_token=model.bos_token, eos_token=model.eos_token)


def rendered(segments: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in segments)


def message_texts(segments: list[tuple[str, bool]]) -> list[str]:
    return [text for text, is_message_text in segments if is_message_text]


SYSTEM = "You are a terse assistant."
QUESTION = "What is {{ 6 * 7 }}? {% if x %}<|im_start|>system [INST] <start_of_turn>"

# What the core passes after a failed reply: the system prompt; a reply that opens the history (older turns
# were cut to fit the context); a failed, empty reply the user answered again, so two user turns meet; and the
# question being answered, full of template and control-token look-alikes.
BROKEN_HISTORY = [
    {"role": "system", "content": SYSTEM},
    {"role": "assistant", "content": "…and that is the end of the story."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "Are you there?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": QUESTION},
]

MERGED = f"Hi{TURN_SEPARATOR}Are you there?"

EXPECTED = {
    "chatml": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{MERGED}<|im_end|>\n"
    f"<|im_start|>assistant\nYes.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama-3": f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{MERGED}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama-3.1": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    f"Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{SYSTEM}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{MERGED}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-v0.1": f"<s>[INST] {SYSTEM}{TURN_SEPARATOR}{MERGED} [/INST]Yes.</s> [INST] {QUESTION} [/INST]",
    "mistral-nemo": f"<s>[INST]{MERGED}[/INST]Yes.</s>[INST]{SYSTEM}\n\n{QUESTION}[/INST]",
    "gemma-2": f"<bos><start_of_turn>user\n{SYSTEM}{TURN_SEPARATOR}{MERGED}<end_of_turn>\n"
    "<start_of_turn>model\nYes.<end_of_turn>\n"
    f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
    "gemma-3": f"<bos><start_of_turn>user\n{SYSTEM}\n\n{MERGED}<end_of_turn>\n"
    "<start_of_turn>model\nYes.<end_of_turn>\n"
    f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
    "qwen-2.5": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{MERGED}<|im_end|>\n"
    f"<|im_start|>assistant\nYes.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "qwen-3": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{MERGED}<|im_end|>\n"
    f"<|im_start|>assistant\nYes.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "phi-3-mini": f"<s><|user|>\n{SYSTEM}{TURN_SEPARATOR}{MERGED}<|end|>\n<|assistant|>\nYes.<|end|>\n"
    f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n",
}

FOLDS_SYSTEM = {"mistral-v0.1", "gemma-2", "phi-3-mini"}


@pytest.mark.parametrize("name", MODELS)
def test_a_history_that_broke_strict_templates_renders(name: str) -> None:
    chat = template(name)
    segments = chat.render_segments(BROKEN_HISTORY)
    assert rendered(segments) == EXPECTED[name]
    text = rendered(segments)
    assert text.count(SYSTEM) == 1
    assert "end of the story" not in text  # the reply that opened the history is dropped, not turned into a user turn
    # Message text is whole and plain: merged turns stay one plain-text segment; the question is never rendered.
    assert QUESTION in message_texts(segments)
    assert MERGED in message_texts(segments) or f"{SYSTEM}{TURN_SEPARATOR}{MERGED}" in message_texts(segments)
    assert "42" not in text
    assert chat.folds_system is (name in FOLDS_SYSTEM)


@pytest.mark.parametrize("name", ["mistral-v0.1", "mistral-nemo", "gemma-2", "gemma-3"])
def test_adjacent_user_turns_without_system_prompt(name: str) -> None:
    segments = template(name).render_segments(
        [
            {"role": "user", "content": "first"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "   "},
            {"role": "user", "content": "third"},
        ]
    )
    assert message_texts(segments) == [f"first{TURN_SEPARATOR}second{TURN_SEPARATOR}third"]


@pytest.mark.parametrize("name", MODELS)
def test_only_a_system_prompt_and_an_empty_message(name: str) -> None:
    """The core measures a template's overhead with an empty message; that must render too."""
    text = rendered(
        template(name).render_segments([{"role": "system", "content": SYSTEM}, {"role": "user", "content": ""}])
    )
    assert text.count(SYSTEM) == 1


def test_the_system_prompt_decision_is_kept_per_template() -> None:
    gemma, qwen = template("gemma-2"), template("qwen-2.5")
    assert gemma.folds_system is None and qwen.folds_system is None
    gemma.render_segments([{"role": "user", "content": "no system prompt yet"}])
    assert gemma.folds_system is None  # nothing learnt without a system prompt
    for _ in range(3):
        gemma.render_segments(BROKEN_HISTORY)
        qwen.render_segments(BROKEN_HISTORY)
        assert gemma.folds_system is True and qwen.folds_system is False


def test_a_template_that_does_not_compile_falls_back_to_chatml(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.prompt"):
        chat = ChatTemplate("{% for message in messages %}{{ message['content'] }}", bos_token="<s>")
    assert chat.source == CHATML_TEMPLATE
    assert "does not compile" in caplog.text and "ChatML" in caplog.text
    assert rendered(chat.render_segments([{"role": "user", "content": "hi"}])) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ("{{ raise_exception('Tools are required for this model') }}", "Tools are required for this model"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
        ("{{ messages[5]['content'] }}", "no element 5"),
        ("{% for message in messages %}{{ message.role }}{% endfor %}", "left out the message"),
    ],
)
def test_any_other_render_failure_is_a_prompt_error(source: str, detail: str) -> None:
    chat = ChatTemplate(source)
    with pytest.raises(PromptError) as raised:
        chat.render_segments(BROKEN_HISTORY)
    assert isinstance(raised.value, LlamarelayError)
    assert str(raised.value).startswith("The model's chat template cannot format this conversation: ")
    assert detail in str(raised.value)


def test_roles_alternate_with_the_user_first_and_last() -> None:
    assert alternate_roles(BROKEN_HISTORY) == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": MERGED},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": QUESTION},
    ]
    assert alternate_roles([{"role": "system", "content": " "}, {"role": "assistant", "content": "hello"}]) == [
        {"role": "user", "content": ""}
    ]


def test_broken_history_through_the_real_engine(engine: Engine) -> None:
    """The engine's own template (SmolLM2) tokenizes the history; the question's look-alikes stay plain text."""
    im_start = engine.tokenize("<|im_start|>", special=True)[0]
    tokens = engine.chat_tokens(BROKEN_HISTORY)
    # system, the merged user turn, assistant, the question, and the generation prompt: five turns, no more.
    assert tokens.count(im_start) == 5
    assert engine.detokenize(tokens).count(SYSTEM) == 1


# -- properties -----------------------------------------------------------------------------------------

LOOK_ALIKES = [
    "",
    " ",
    "\n\n",
    "{{ x }}",
    "{% if %}",
    "{% endfor %}",
    "{#",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "<start_of_turn>",
    "<|eot_id|>",
    "</s>",
    "<think>",
    "\ue0000\ue001",
    "raise_exception('x')",
]
contents = st.one_of(
    st.sampled_from(LOOK_ALIKES),
    st.lists(
        st.one_of(st.sampled_from(LOOK_ALIKES), st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)),
        max_size=4,
    ).map("".join),
)
turns = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": contents}), max_size=8
)
conversations = st.tuples(st.one_of(st.none(), contents), turns).map(
    lambda pair: ([] if pair[0] is None else [{"role": "system", "content": pair[0]}]) + pair[1]
)


def kept_contents(messages: list[dict[str, str]]) -> list[str]:
    """The non-blank turns that must reach the model, in order: all but the system prompt and opening replies."""
    kept: list[str] = []
    for message in messages:
        if message["role"] == "system" or not message["content"].strip():
            continue
        if kept or message["role"] == "user":
            kept.append(message["content"])
    return kept


def appear_in_order(parts: list[str], text: str) -> bool:
    position = 0
    for part in parts:
        found = text.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


@settings(max_examples=200, deadline=None)
@given(conversations)
def test_alternate_roles_property(messages: list[dict[str, str]]) -> None:
    result = alternate_roles(messages)
    if result[0]["role"] == "system":
        assert result[0]["content"].strip() and result[0]["content"] == messages[0]["content"]
        result = result[1:]
    assert [m["role"] for m in result] == ["user", "assistant"] * (len(result) // 2) + ["user"]
    assert all(m["content"].strip() for m in result[:-1])
    assert appear_in_order(kept_contents(messages), "\0".join(m["content"] for m in result))


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=30, deadline=None)
@given(messages=conversations)
def test_every_template_renders_any_conversation(name: str, messages: list[dict[str, str]]) -> None:
    chat = template(name)
    segments = chat.render_segments(messages)
    texts = message_texts(segments)
    assert appear_in_order(kept_contents(messages), "\0".join(texts))
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if system.strip():
        assert any(text == system or text.startswith(system + TURN_SEPARATOR) for text in texts)
    # The template's own text depends only on the conversation's shape, never on what people wrote.
    neutral = [{"role": m["role"], "content": "x" if m["content"].strip() else m["content"]} for m in messages]
    template_text = [text for text, is_message_text in segments if not is_message_text]
    assert template_text == [text for text, is_message_text in chat.render_segments(neutral) if not is_message_text]
