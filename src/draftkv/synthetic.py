"""Synthetic long contexts: varied project notes with one fact hidden at a chosen depth.

Used by the examples, the integration tests and the benchmarks, so that a prompt of any length can
be made here without downloading a data set.
"""

from __future__ import annotations

import random

TEAMS = ("storage", "billing", "search", "mobile", "data platform", "security", "design", "support tooling",
         "infrastructure", "growth")
PEOPLE = ("Amara", "Bastian", "Chen", "Dolores", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas", "Keiko", "Luis",
          "Maren", "Nikhil", "Olga", "Pavel")
VERBS = ("finished", "started", "paused", "reviewed", "rewrote", "benchmarked", "documented", "split up", "retired",
         "migrated")
THINGS = ("the indexing service", "the invoice exporter", "the on-call rota", "the nightly backup job",
          "the login page", "the metrics pipeline", "the feature-flag client", "the audit log", "the image resizer",
          "the onboarding checklist", "the rate limiter", "the search ranking tests", "the payment retry queue",
          "the staging cluster", "the alerting rules")
ISSUES = ("a flaky integration test", "slow queries on the orders table", "a memory leak in the worker pool",
          "confusing error messages", "a missing index", "an expired certificate on staging",
          "duplicate webhook deliveries", "timeouts from the geocoding provider", "stale cache entries after deploys",
          "a race in the upload handler")
LAUNCH_FACT = ("Release planning: after the review with legal and support, the team agreed that the public launch "
               "of the new product will take place on Tuesday, 14 October, at 09:00 UTC. Marketing will announce it "
               "the same morning.")
LAUNCH_QUESTION = "When is the launch? Answer with the date and time."


def note(rng: random.Random, week: int) -> str:
    team = rng.choice(TEAMS)
    first, second = rng.sample(PEOPLE, 2)
    status = rng.choice(["merged", "in review", "planned for next week", "blocked on another team"])
    place = rng.choice(["queue", "database", "cluster", "dashboard"])
    sentences = [
        f"{team.capitalize()} team, week {week}: {first} {rng.choice(VERBS)} {rng.choice(THINGS)}, and {second} "
        f"{rng.choice(VERBS)} {rng.choice(THINGS)}.",
        f"They spent {rng.randint(2, 9)} days on {rng.choice(ISSUES)}; the fix is {status}.",
        f"Open question from {rng.choice(PEOPLE)}: should {rng.choice(THINGS)} move to the shared {place}?",
        f"Error rate went from {rng.randint(2, 40) / 10:.1f}% to {rng.randint(1, 20) / 10:.1f}%, and p95 latency is "
        f"now {rng.randint(80, 900)} ms.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences)


def notes_context(num_tokens: int, tokenizer, *, fact: str = LAUNCH_FACT, depth: float = 0.5, seed: int = 0) -> str:
    """Notes of about `num_tokens` tokens (by `tokenizer`, context only) with `fact` at `depth` (0..1)."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    budget = num_tokens - len(tokenizer.encode(fact, add_special_tokens=False))
    used = 0
    while True:
        paragraph = note(rng, len(paragraphs) + 1)
        cost = len(tokenizer.encode("\n\n" + paragraph, add_special_tokens=False))
        if used + cost > budget:
            break
        paragraphs.append(paragraph)
        used += cost
    paragraphs.insert(round(depth * len(paragraphs)), fact)
    return "\n\n".join(paragraphs)
