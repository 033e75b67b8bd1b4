"""An LLM judge over any OpenAI-compatible chat-completions endpoint, and FastChat's rating parser.

The API key is read from an environment variable (default `OPENAI_API_KEY`) when the client is built; it is never
logged, stored in results or passed to anything but the client. Calls that fail for transient reasons (connection
errors, timeouts, rate limits, 5xx answers) are retried with exponential backoff; an authentication, permission or
unknown-model answer stops the run at once with a message that says what to fix; any other client error
(for example a prompt too long for the judge) gives FastChat's `$ERROR$` judgment, which rates -1.
"""

from __future__ import annotations

import ast
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

DEFAULT_JUDGE_MODEL = "gpt-4"  # FastChat's default judge for MT-Bench
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
API_ERROR_OUTPUT = "$ERROR$"  # what FastChat records when the judge could not be reached

# FastChat's patterns (fastchat/llm_judge/common.py): `[[rating]]`, else `[rating]`.
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeConfigurationError(RuntimeError):
    """The judge cannot be used at all (missing key, rejected key, unknown model); retrying would not help."""


def parse_rating(judgment: str) -> float:
    """The rating in a judgment as FastChat reads it (`[[8]]`, else `[8]`); -1 when there is none."""
    match = ONE_SCORE_PATTERN.search(judgment) or ONE_SCORE_PATTERN_BACKUP.search(judgment)
    if match is None:
        return -1
    return ast.literal_eval(match.group(1))


@dataclass
class JudgeSettings:
    """Which judge to call and how (FastChat calls GPT-4 with temperature 0 and at most 2048 tokens)."""

    model: str = DEFAULT_JUDGE_MODEL
    base_url: Optional[str] = None  # None: the OpenAI API (or $OPENAI_BASE_URL)
    api_key_env: str = DEFAULT_API_KEY_ENV
    temperature: float = 0.0
    max_tokens: int = 2048
    max_retries: int = 8
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 60.0
    request_timeout: float = 300.0


class JudgeClient:
    """Sends chat messages to the judge and returns its text, retrying transient failures with backoff."""

    def __init__(self, settings: Optional[JudgeSettings] = None) -> None:
        self.settings = settings or JudgeSettings()
        self._client = self._build_client()

    def _build_client(self):
        """An `openai.OpenAI` client for the endpoint, with the key from the environment and no built-in retries."""
        try:
            import openai
        except ImportError as error:
            raise ImportError(
                "The judge needs the OpenAI client: pip install 'openai>=1' (the 'eval' extra)."
            ) from error
        api_key = os.environ.get(self.settings.api_key_env)
        if not api_key:
            if self.settings.base_url is None:
                raise JudgeConfigurationError(
                    f"No API key: set the environment variable {self.settings.api_key_env} for the OpenAI judge, or "
                    "pass --judge_base_url for an OpenAI-compatible endpoint (and --judge_api_key_env to name the "
                    "variable holding its key)."
                )
            api_key = "EMPTY"  # local OpenAI-compatible servers usually accept any key
        return openai.OpenAI(
            api_key=api_key,
            base_url=self.settings.base_url,
            max_retries=0,
            timeout=self.settings.request_timeout,
        )

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter for retry number `attempt` (0-based)."""
        delay = min(self.settings.retry_max_seconds, self.settings.retry_base_seconds * 2**attempt)
        return delay * (0.5 + random.random() / 2)

    def complete(self, messages: list[dict]) -> str:
        """The judge's answer to `messages`, or `$ERROR$` when it cannot be had (see the module docstring)."""
        import openai

        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            try:
                response = self._client.chat.completions.create(
                    model=self.settings.model,
                    messages=messages,
                    n=1,
                    temperature=self.settings.temperature,
                    max_tokens=self.settings.max_tokens,
                )
                return response.choices[0].message.content or ""
            except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
                raise JudgeConfigurationError(
                    f"The judge endpoint rejected the API key from ${self.settings.api_key_env} "
                    f"({type(error).__name__}); check the key and --judge_base_url."
                ) from None
            except openai.NotFoundError:
                raise JudgeConfigurationError(
                    f"The judge endpoint does not know the model {self.settings.model!r} (or the URL "
                    f"{self.settings.base_url or 'the OpenAI API'} has no chat-completions route); check "
                    "--judge_model and --judge_base_url."
                ) from None
            except (
                openai.APIConnectionError,
                openai.APITimeoutError,
                openai.RateLimitError,
                openai.InternalServerError,
            ) as error:
                reason = type(error).__name__
            except openai.APIStatusError as error:
                if error.status_code < 500 and error.status_code not in (408, 409, 429):
                    logger.warning(
                        "The judge refused a request (HTTP %d); recording %s", error.status_code, API_ERROR_OUTPUT
                    )
                    return API_ERROR_OUTPUT
                reason = f"HTTP {error.status_code}"
            if attempt + 1 < attempts:
                delay = self._delay(attempt)
                logger.warning(
                    "Judge call failed (%s); retry %d of %d in %.1f s",
                    reason,
                    attempt + 1,
                    self.settings.max_retries,
                    delay,
                )
                time.sleep(delay)
        logger.error("Judge call failed %d times; recording %s", attempts, API_ERROR_OUTPUT)
        return API_ERROR_OUTPUT


__all__ = [
    "API_ERROR_OUTPUT",
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_JUDGE_MODEL",
    "JudgeClient",
    "JudgeConfigurationError",
    "JudgeSettings",
    "ONE_SCORE_PATTERN",
    "ONE_SCORE_PATTERN_BACKUP",
    "parse_rating",
]
