"""MT-Bench answers (Alpaca conversation, FastChat answer format) and judge inputs (FastChat's prompts, references)."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
from tlora.evaluation.mt_bench import (
    CATEGORY_TEMPERATURES,
    NEED_REF_CATEGORIES,
    SingleMatch,
    conversation_prompt,
    generate_answers,
    judge_messages,
    load_answers,
    load_judge_prompts,
    load_questions,
    make_single_matches,
    question_temperature,
)
from tlora.data.prompts import format_prompt


@pytest.fixture(scope="module")
def mt_bench(shared_data):
    """Paths of FastChat's MT-Bench files in ../shared/data."""
    folder = shared_data / "mt_bench"
    return {
        "questions": str(folder / "question.jsonl"),
        "judge_prompts": str(folder / "judge_prompts.jsonl"),
        "references": str(folder / "reference_answer" / "gpt-4.jsonl"),
    }


def fake_answers(questions) -> dict:
    """FastChat answer rows with recognisable text for every question."""
    return {
        question["question_id"]: {
            "question_id": question["question_id"],
            "answer_id": f"a{question['question_id']}",
            "model_id": "tiny",
            "choices": [
                {
                    "index": 0,
                    "turns": [f"answer one to {question['question_id']}", f"answer two to {question['question_id']}"],
                }
            ],
            "tstamp": 0.0,
        }
        for question in questions
    }


class RecordingBackend:
    """A backend that answers from the prompt and records the prompts and temperatures it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.calls = []

    def generate(self, prompts, settings):
        self.calls.append((list(prompts), settings.temperature, list(settings.stop), settings.max_new_tokens))
        return [f"  reply {len(prompt)}\n" for prompt in prompts]


def test_the_second_turn_prompt_holds_the_first_turn_and_its_answer():
    prompt = conversation_prompt(["What is 2 + 2?", "And times 3?"], ["2 + 2 = 4."])
    assert prompt == format_prompt("What is 2 + 2?") + "2 + 2 = 4.\n\n### Instruction:\nAnd times 3?\n\n### Response:"
    assert conversation_prompt(["Only one"], []) == format_prompt("Only one")
    with pytest.raises(ValueError):
        conversation_prompt(["q"], ["a"])


def test_temperatures_follow_fastchat_or_are_greedy():
    assert question_temperature("writing") == 0.7 and question_temperature("stem") == 0.1
    assert question_temperature("math") == 0.0 and question_temperature("unlisted") == 0.7
    assert question_temperature("writing", "greedy") == 0.0
    with pytest.raises(ValueError, match="fastchat, greedy"):
        question_temperature("writing", "hot")


def test_answers_are_generated_turn_by_turn_in_fastchat_format(mt_bench):
    questions = load_questions(mt_bench["questions"])
    assert len(questions) == 80 and all(len(question["turns"]) == 2 for question in questions)
    backend = RecordingBackend()
    rows = generate_answers(questions, backend, model_id="tiny", max_new_tokens=7)
    assert len(rows) == 80 and set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert rows[0]["model_id"] == "tiny" and rows[0]["choices"][0]["index"] == 0
    turns = rows[0]["choices"][0]["turns"]
    assert len(turns) == 2 and turns[0] == turns[0].strip()
    # two turns x three temperatures (0.0, 0.1, 0.7), each batch at its category's temperature
    assert [temperature for _, temperature, _, _ in backend.calls] == [0.0, 0.1, 0.7, 0.0, 0.1, 0.7]
    assert all(
        stop == ["### Instruction", "Below is an instruction"] and limit == 7 for _, _, stop, limit in backend.calls
    )
    first_turn_prompts = [prompt for prompts, *_ in backend.calls[:3] for prompt in prompts]
    assert format_prompt(questions[0]["turns"][0]) in first_turn_prompts
    second_turn_prompts = [prompt for prompts, *_ in backend.calls[3:] for prompt in prompts]
    expected = conversation_prompt(questions[0]["turns"], [turns[0]])
    assert expected in second_turn_prompts and turns[0] in expected


def test_greedy_mode_answers_everything_at_temperature_zero(mt_bench):
    backend = RecordingBackend()
    generate_answers(load_questions(mt_bench["questions"], limit=12), backend, model_id="m", temperature_mode="greedy")
    assert [temperature for _, temperature, _, _ in backend.calls] == [0.0, 0.0]


def test_the_answer_script_writes_a_fastchat_answer_file_with_the_tiny_model(
    mt_bench, tiny_model_dir, tmp_path, repo_root, monkeypatch
):
    answer_file = tmp_path / "answers.jsonl"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "chat/gen_mt_bench_answers.py",
            "--model",
            str(tiny_model_dir),
            "--backend",
            "hf",
            "--question_file",
            mt_bench["questions"],
            "--answer_file",
            str(answer_file),
            "--limit",
            "2",
            "--max_new_tokens",
            "4",
            "--temperature_mode",
            "greedy",
        ],
    )
    runpy.run_path(str(repo_root / "chat" / "gen_mt_bench_answers.py"), run_name="__main__")
    answers = load_answers(str(answer_file))
    assert sorted(answers) == [81, 82]
    assert answers[81]["model_id"] == tiny_model_dir.name
    assert all(len(row["choices"][0]["turns"]) == 2 for row in answers.values())


def test_matches_use_fastchat_single_prompts_and_references_for_math_reasoning_coding(mt_bench):
    questions = load_questions(mt_bench["questions"])
    prompts = load_judge_prompts(mt_bench["judge_prompts"])
    references = load_answers(mt_bench["references"])
    matches = make_single_matches(questions, fake_answers(questions), prompts, references)
    assert len(matches) == 160
    file_prompts = {row["name"]: row for row in map(json.loads, open(mt_bench["judge_prompts"], encoding="utf-8"))}
    for match in matches:
        needs_reference = match.question["category"] in ("math", "reasoning", "coding")
        name = {
            (False, False): "single-v1",
            (False, True): "single-v1-multi-turn",
            (True, False): "single-math-v1",
            (True, True): "single-math-v1-multi-turn",
        }[(needs_reference, match.multi_turn)]
        assert match.judge_prompt == file_prompts[name]
        messages, user_prompt = judge_messages(match)
        assert messages[0] == {"role": "system", "content": file_prompts[name]["system_prompt"]}
        assert messages[1] == {"role": "user", "content": user_prompt}
        answer_turns = match.answer["choices"][0]["turns"]
        assert answer_turns[0] in user_prompt and match.question["turns"][0] in user_prompt
        if match.multi_turn:
            assert answer_turns[1] in user_prompt and match.question["turns"][1] in user_prompt
        if needs_reference:
            reference_turns = references[match.question["question_id"]]["choices"][0]["turns"]
            assert reference_turns[0] in user_prompt
            assert (reference_turns[1] in user_prompt) == match.multi_turn
        else:
            assert match.reference is None and "Reference Answer" not in user_prompt
    assert sum(match.reference is not None for match in matches) == 60  # 30 questions x 2 turns


def test_a_missing_reference_or_answer_is_an_error(mt_bench):
    questions = load_questions(mt_bench["questions"])
    prompts = load_judge_prompts(mt_bench["judge_prompts"])
    with pytest.raises(ValueError, match="needs a reference answer"):
        make_single_matches(questions, fake_answers(questions), prompts, {})
    with pytest.raises(ValueError, match="no answer to question 81"):
        make_single_matches(questions, {}, prompts, load_answers(mt_bench["references"]))


def test_judge_inputs_match_fastchat_exactly(mt_bench, monkeypatch):
    common = pytest.importorskip("fastchat.llm_judge.common")
    assert list(NEED_REF_CATEGORIES) == common.NEED_REF_CATS
    assert CATEGORY_TEMPERATURES == common.temperature_config
    questions = load_questions(mt_bench["questions"])
    answers = fake_answers(questions)
    prompts = load_judge_prompts(mt_bench["judge_prompts"])
    references = load_answers(mt_bench["references"])
    sent = []

    def fake_chat_completion(model, conv, temperature, max_tokens, api_dict=None):
        sent.append((conv.to_openai_api_messages(), temperature, max_tokens))
        return "Rating: [[7]]"

    monkeypatch.setattr(common, "chat_completion_openai", fake_chat_completion)
    for match in make_single_matches(questions, answers, prompts, references):
        judge = common.Judge(
            "gpt-4", match.judge_prompt, ref_based=match.reference is not None, multi_turn=match.multi_turn
        )
        rating, user_prompt, _ = common.run_judge_single(
            match.question, match.answer, judge, match.reference, multi_turn=match.multi_turn
        )
        messages, ours = judge_messages(match)
        assert ours == user_prompt and messages == sent[-1][0] and rating == 7
        assert sent[-1][1:] == (0, 2048)


def test_single_match_turn_numbers():
    match = SingleMatch({"question_id": 1, "turns": ["a", "b"]}, {}, {}, None, multi_turn=True)
    assert match.turn == 2
