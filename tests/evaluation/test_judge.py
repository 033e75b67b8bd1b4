"""The judge client and MT-Bench judging end to end, against an OpenAI-compatible stand-in served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import runpy
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tlora.evaluation.generation import CallableBackend
from tlora.evaluation.judge import (
    API_ERROR_OUTPUT,
    JudgeClient,
    JudgeConfigurationError,
    JudgeSettings,
    parse_rating,
)
from tlora.evaluation.mt_bench import (
    generate_answers,
    judge_messages,
    load_answers,
    load_judge_prompts,
    load_questions,
    make_single_matches,
    summarize_judgments,
    write_answers,
)

pytest.importorskip("openai")

SECRET = "sk-stand-in-secret-0123456789"
NO_RATING_MARKER = "(no rating please)"


def stand_in_rating(user_prompt: str) -> int:
    """The stand-in's deterministic rating of a prompt: 1..10 from its SHA-256."""
    return int(hashlib.sha256(user_prompt.encode()).hexdigest(), 16) % 10 + 1


class StandInJudge:
    """A stdlib OpenAI-compatible `/v1/chat/completions` server that rates deterministically from the prompt.

    `fail_first` requests get HTTP `fail_status`; a user prompt containing NO_RATING_MARKER gets an answer without a
    rating; every request's headers and body are recorded.
    """

    def __init__(self, fail_first: int = 0, fail_status: int = 500) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.requests: list[tuple[dict, dict]] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append(({key.lower(): value for key, value in self.headers.items()}, body))
                    failing = len(judge.requests) <= judge.fail_first
                if failing or self.path != "/v1/chat/completions":
                    status = judge.fail_status if failing else 404
                    payload = {"error": {"message": "stand-in failure", "type": "server_error", "code": None}}
                else:
                    status = 200
                    user = body["messages"][-1]["content"]
                    text = (
                        "I cannot rate this."
                        if NO_RATING_MARKER in user
                        else (f"The answer is fine. Rating: [[{stand_in_rating(user)}]]")
                    )
                    payload = {
                        "id": "chatcmpl-stand-in",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL of the stand-in."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "StandInJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()


def client_for(judge: StandInJudge, **overrides) -> JudgeClient:
    """A JudgeClient on the stand-in, with fast retries."""
    options = dict(
        model="stand-in-judge",
        base_url=judge.base_url,
        api_key_env="TLORA_TEST_JUDGE_KEY",
        retry_base_seconds=0.01,
        retry_max_seconds=0.02,
        request_timeout=10,
    )
    options.update(overrides)
    return JudgeClient(JudgeSettings(**options))


@pytest.fixture(autouse=True)
def judge_key(monkeypatch):
    """The stand-in's key, in the environment only."""
    monkeypatch.setenv("TLORA_TEST_JUDGE_KEY", SECRET)


@pytest.fixture(scope="module")
def mt_bench(shared_data):
    """Paths of FastChat's MT-Bench files in ../shared/data."""
    folder = shared_data / "mt_bench"
    return {
        "questions": str(folder / "question.jsonl"),
        "judge_prompts": str(folder / "judge_prompts.jsonl"),
        "references": str(folder / "reference_answer" / "gpt-4.jsonl"),
    }


# ------------------------------------------------------------------------------------------------ ratings


@pytest.mark.parametrize(
    "judgment, rating",
    [
        ("Rating: [[8]]", 8),
        ("[[7.5]] and later [[2]]", 7.5),
        ("Rating: [6]", 6),
        ("Score [3] but [[9]]", 9),
        ("no number", -1),
        ("Rating: [[eight]]", -1),
        (API_ERROR_OUTPUT, -1),
    ],
)
def test_ratings_are_parsed_as_fastchat_does(judgment, rating):
    assert parse_rating(judgment) == rating


def test_our_patterns_are_fastchats():
    common = pytest.importorskip("fastchat.llm_judge.common")
    from tlora.evaluation.judge import ONE_SCORE_PATTERN, ONE_SCORE_PATTERN_BACKUP

    assert ONE_SCORE_PATTERN.pattern == common.one_score_pattern.pattern
    assert ONE_SCORE_PATTERN_BACKUP.pattern == common.one_score_pattern_backup.pattern


def test_failed_ratings_are_excluded_from_the_mean_and_counted():
    rows = [{"score": 8, "turn": 1}, {"score": -1, "turn": 1}, {"score": 4, "turn": 2}, {"score": 6, "turn": 2}]
    assert summarize_judgments(rows) == {
        "score": 6.0,
        "turn_1": 8.0,
        "turn_2": 5.0,
        "num_judgments": 3,
        "num_failed": 1,
    }


# ------------------------------------------------------------------------------------------------ the client


def test_the_client_sends_fastchat_settings_and_the_key_only_as_a_header():
    with StandInJudge() as judge:
        text = client_for(judge).complete([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert text == f"The answer is fine. Rating: [[{stand_in_rating('u')}]]"
    headers, body = judge.requests[0]
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "stand-in-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 2048
    assert body["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def test_transient_failures_are_retried_with_backoff():
    with StandInJudge(fail_first=2, fail_status=503) as judge:
        assert "Rating" in client_for(judge).complete([{"role": "user", "content": "u"}])
    assert len(judge.requests) == 3


def test_persistent_failures_give_fastchats_error_output():
    with StandInJudge(fail_first=100, fail_status=500) as judge:
        assert client_for(judge, max_retries=2).complete([{"role": "user", "content": "u"}]) == API_ERROR_OUTPUT
    assert len(judge.requests) == 3


def test_a_rejected_key_stops_at_once_without_showing_it():
    with StandInJudge(fail_first=100, fail_status=401) as judge:
        with pytest.raises(JudgeConfigurationError, match="TLORA_TEST_JUDGE_KEY") as error:
            client_for(judge).complete([{"role": "user", "content": "u"}])
    assert len(judge.requests) == 1 and SECRET not in str(error.value)


def test_the_openai_judge_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeConfigurationError, match="OPENAI_API_KEY"):
        JudgeClient(JudgeSettings())


# ------------------------------------------------------------------------------------------------ end to end


def answer_text(prompt: str) -> str:
    """A stand-in model: a reply that depends on the prompt; question 81's second turn gets an unratable answer."""
    if "Rewrite your previous response. Start every sentence with the letter A." in prompt:
        return f"A reply. {NO_RATING_MARKER}"
    return f"Reply number {len(prompt) % 97}."


def run_judge_script(repo_root, monkeypatch, judge: StandInJudge, mt_bench: dict, answer_file, *extra: str) -> None:
    """Run chat/judge_mt_bench.py in this process on `answer_file` with the stand-in judge and the shared data."""
    arguments = ["--predictions", str(answer_file), "--question_file", mt_bench["questions"]]
    arguments += ["--judge_prompts_file", mt_bench["judge_prompts"], "--reference_answer_file", mt_bench["references"]]
    arguments += ["--judge_base_url", judge.base_url, "--judge_model", "stand-in-judge"]
    arguments += ["--judge_api_key_env", "TLORA_TEST_JUDGE_KEY", *extra]
    monkeypatch.setattr(sys, "argv", ["chat/judge_mt_bench.py", *arguments])
    runpy.run_path(str(repo_root / "chat" / "judge_mt_bench.py"), run_name="__main__")


def test_answers_to_judgment_to_score_end_to_end(mt_bench, tmp_path, repo_root, monkeypatch):
    questions = load_questions(mt_bench["questions"])
    answer_file = tmp_path / "eval" / "mt_bench_answers.jsonl"
    write_answers(str(answer_file), generate_answers(questions, CallableBackend(answer_text), model_id="stand-in"))
    output = tmp_path / "eval" / "mt_bench.json"
    with StandInJudge() as judge:
        run_judge_script(
            repo_root, monkeypatch, judge, mt_bench, answer_file, "--output", str(output), "--parallel", "4"
        )
    assert len(judge.requests) == 160

    # What the score must be: the stand-in's ratings of exactly the prompts FastChat's recipe builds.
    matches = make_single_matches(
        questions,
        load_answers(str(answer_file)),
        load_judge_prompts(mt_bench["judge_prompts"]),
        load_answers(mt_bench["references"]),
    )
    expected = {}
    for match in matches:
        _, user_prompt = judge_messages(match)
        expected[(match.question["question_id"], match.turn)] = (
            -1 if NO_RATING_MARKER in user_prompt else stand_in_rating(user_prompt)
        )
    valid = {key: value for key, value in expected.items() if value != -1}
    result = json.loads(output.read_text())
    assert result["task"] == "mt_bench" and result["judge_model"] == "stand-in-judge"
    assert result["num_judgments"] == 159 and result["num_failed"] == 1 == len(expected) - len(valid)
    assert result["score"] == pytest.approx(sum(valid.values()) / len(valid))
    assert result["turn_1"] == pytest.approx(sum(v for (_, turn), v in valid.items() if turn == 1) / 80)
    assert result["turn_2"] == pytest.approx(sum(v for (_, turn), v in valid.items() if turn == 2) / 79)
    assert 1 <= result["score"] <= 10
    sent_prompts = {body["messages"][1]["content"] for _, body in judge.requests}
    assert sent_prompts == {judge_messages(match)[1] for match in matches}

    judgment_file = tmp_path / "eval" / "mt_bench_judgments.jsonl"
    judgments = [json.loads(line) for line in judgment_file.read_text().splitlines()]
    assert len(judgments) == 160
    fastchat_fields = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    assert set(judgments[0]) == fastchat_fields | {"digest"}
    assert {tuple(row["judge"]) for row in judgments} == {
        ("stand-in-judge", name)
        for name in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn")
    }
    assert all(row["model"] == "stand-in" for row in judgments)
    for path in (output, judgment_file, answer_file):
        assert SECRET not in path.read_text()

    # A second run reuses the valid judgments and asks again only for the one without a rating.
    with StandInJudge() as judge:
        run_judge_script(repo_root, monkeypatch, judge, mt_bench, answer_file, "--output", str(output))
    assert len(judge.requests) == 1
    assert json.loads(output.read_text())["score"] == pytest.approx(result["score"])


def test_judging_a_subset_with_limit(mt_bench, tmp_path):
    from tlora.evaluation.mt_bench import run_judgment

    questions = load_questions(mt_bench["questions"], limit=3)
    answer_file = tmp_path / "answers.jsonl"
    write_answers(str(answer_file), generate_answers(questions, CallableBackend(lambda p: "ok"), model_id="m"))
    with StandInJudge() as judge:
        result = run_judgment(
            answer_file=str(answer_file),
            question_file=mt_bench["questions"],
            judge_prompts_file=mt_bench["judge_prompts"],
            reference_answer_file="/nonexistent",
            client=client_for(judge),
            limit=3,
            parallel=2,
        )
    assert result["num_judgments"] == 6 and result["limit"] == 3 and result["reference_answer_file"] is None
    assert [(row["question_id"], row["turn"]) for row in result["records"]] == [
        (81, 1),
        (81, 2),
        (82, 1),
        (82, 2),
        (83, 1),
        (83, 2),
    ]


# ------------------------------------------------------------------------------------------------ stale judgments


def test_a_changed_answer_is_judged_again_and_only_that_turn(mt_bench, tmp_path):
    from tlora.evaluation.mt_bench import run_judgment

    questions = load_questions(mt_bench["questions"], limit=3)
    answer_file = tmp_path / "run" / "eval" / "mt_bench_answers.jsonl"
    answers = generate_answers(questions, CallableBackend(lambda p: f"Reply {len(p) % 89}."), model_id="merged")
    write_answers(str(answer_file), answers)
    judgment_file = tmp_path / "run" / "eval" / "mt_bench_judgments.jsonl"

    def judge_once(changed_answers) -> tuple[dict, list[str]]:
        write_answers(str(answer_file), changed_answers)
        with StandInJudge() as judge:
            result = run_judgment(
                answer_file=str(answer_file),
                question_file=mt_bench["questions"],
                judge_prompts_file=mt_bench["judge_prompts"],
                reference_answer_file=mt_bench["references"],
                client=client_for(judge),
                judgment_file=str(judgment_file),
                limit=3,
                parallel=2,
            )
        return result, [body["messages"][1]["content"] for _, body in judge.requests]

    first, sent = judge_once(answers)
    assert len(sent) == 6 and first["num_judgments"] == 6
    assert judge_once(answers)[1] == []  # nothing changed: every judgment is reused

    # Same question, turn, model id ("merged") and judge, new second answer: only turn 2 of that question is re-judged.
    changed = [dict(row, choices=[dict(row["choices"][0], turns=list(row["choices"][0]["turns"]))]) for row in answers]
    changed[1]["choices"][0]["turns"][1] = "A different second answer."
    second, sent = judge_once(changed)
    assert len(sent) == 1 and "A different second answer." in sent[0]
    by_key = {(row["question_id"], row["turn"]): row for row in second["records"]}
    assert "A different second answer." in by_key[(82, 2)]["user_prompt"]
    expected = stand_in_rating(by_key[(82, 2)]["user_prompt"])
    assert by_key[(82, 2)]["score"] == expected
    others = {key: row["score"] for key, row in by_key.items() if key != (82, 2)}
    before = {(row["question_id"], row["turn"]): row["score"] for row in first["records"]}
    assert others == {key: score for key, score in before.items() if key != (82, 2)}

    # A new first answer changes what both turns' judges see (turn 2 shows the whole conversation).
    changed[0]["choices"][0]["turns"][0] = "A different first answer."
    assert len(judge_once(changed)[1]) == 2
    # Another judge model sees the same prompts but is a different judge: everything is judged again.
    with StandInJudge() as judge:
        run_judgment(
            answer_file=str(answer_file),
            question_file=mt_bench["questions"],
            judge_prompts_file=mt_bench["judge_prompts"],
            reference_answer_file=mt_bench["references"],
            client=client_for(judge, model="another-judge"),
            judgment_file=str(judgment_file),
            limit=3,
        )
    assert len(judge.requests) == 6


def test_judgments_live_beside_the_answers_they_judge(mt_bench, tmp_path, repo_root, monkeypatch):
    questions = load_questions(mt_bench["questions"], limit=2)
    results = {}
    for run in ("run_a", "run_b"):
        answer_file = tmp_path / run / "merged_answers.jsonl"
        answers = generate_answers(questions, CallableBackend(lambda prompt, reply=run: reply), model_id="merged")
        write_answers(str(answer_file), answers)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for run in ("run_a", "run_b"):
        with StandInJudge() as judge:
            answer_file = tmp_path / run / "merged_answers.jsonl"
            run_judge_script(repo_root, monkeypatch, judge, mt_bench, answer_file, "--limit", "2")
        results[run] = len(judge.requests)
    assert results == {"run_a": 4, "run_b": 4}  # the second run does not reuse the first run's judgments
    assert list(elsewhere.iterdir()) == []
    for run in ("run_a", "run_b"):
        assert (tmp_path / run / "merged_judgments.jsonl").is_file()
        result = json.loads((tmp_path / run / "merged.json").read_text())
        assert result["judgment_file"] == str(tmp_path / run / "merged_judgments.jsonl")
        assert result["protocol"] == "judge:stand-in-judge" and result["data"]["num_items"] == 2


def test_the_default_model_id_of_a_merged_copy_names_its_run(tmp_path):
    from tlora.evaluation.mt_bench import default_model_id

    (tmp_path / "chat-tlora" / "merged").mkdir(parents=True)
    (tmp_path / "chat-tlora" / "run_record.json").write_text("{}")
    assert default_model_id(str(tmp_path / "chat-tlora" / "merged")) == "chat-tlora/merged"
    assert default_model_id(str(tmp_path / "chat-tlora")) == "chat-tlora"
    assert default_model_id("meta-llama/Llama-2-7b-hf") == "Llama-2-7b-hf"


def test_an_answer_file_with_a_repeated_or_unknown_question_is_refused_before_judging(
    mt_bench, tmp_path, repo_root, monkeypatch
):
    # A repeated question id used to be overwritten by its later line, silently; an unknown one was ignored.
    questions = load_questions(mt_bench["questions"])
    rows = generate_answers(questions, CallableBackend(answer_text), model_id="stand-in")
    answer_file = tmp_path / "answers.jsonl"
    cases = (
        (
            rows + [dict(rows[3])],
            rf"answers.jsonl, line 81 \(row 80\): question_id {rows[3]['question_id']} appears "
            r"twice \(first at .*answers.jsonl, line 4 \(row 3\)\)",
        ),
        (rows + [{**rows[0], "question_id": 999}], r"line 81 \(row 80\): question_id 999 is outside .*question.jsonl"),
        ([], r"answers.jsonl holds no predictions \(an empty file\)"),
    )
    for answers, message in cases:
        answer_file.write_text("".join(json.dumps(row) + "\n" for row in answers))
        with StandInJudge() as judge:
            with pytest.raises(ValueError, match=message):
                run_judge_script(repo_root, monkeypatch, judge, mt_bench, answer_file, "--output", str(tmp_path / "o"))
        assert judge.requests == []


def test_mt_bench_results_carry_the_common_result_keys_of_every_task(mt_bench, tmp_path):
    from tlora.evaluation.mt_bench import run_judgment

    questions = load_questions(mt_bench["questions"], limit=2)
    answer_file = tmp_path / "answers.jsonl"
    write_answers(str(answer_file), generate_answers(questions, CallableBackend(lambda p: "ok"), model_id="m"))
    with StandInJudge() as judge:
        result = run_judgment(
            answer_file=str(answer_file),
            question_file=mt_bench["questions"],
            judge_prompts_file=mt_bench["judge_prompts"],
            reference_answer_file="/nonexistent",
            client=client_for(judge),
            limit=2,
            parallel=2,
        )
    assert {"task", "protocol", "data", "num_items", "model", "backend", "records"} <= set(result)
    assert (result["task"], result["num_items"], result["data"]["num_items"]) == ("mt_bench", 2, 2)
    assert result["predictions_file"] == result["answer_file"] == str(answer_file)
