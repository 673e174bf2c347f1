"""expert-json data: facts about an entity written as prose, a JSON schema, and the gold object; the scorer.

A record of a random kind (person, product, event, ...) gets 3-5 of its fields, rendered as sentences in
random order with a distractor sentence. The prompt gives the JSON schema of the chosen fields; the answer is
the object. Scoring: the output parses as JSON and equals the gold object field for field.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from expertserve.datasets.common import Example, chat_example

SYSTEM = "You extract facts from text into JSON. Answer with one JSON object matching the schema."
FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Lars",
    "Fatima",
    "Carlos",
    "Priya",
    "Tom",
    "Olga",
    "Kwame",
    "Lena",
    "Diego",
    "Sara",
    "Ivan",
    "Mei",
    "Noah",
    "Amara",
    "Hugo",
    "Zoe",
    "Ravi",
]
LAST = [
    "Silva",
    "Smith",
    "Tanaka",
    "Berg",
    "Khan",
    "Lopez",
    "Patel",
    "Brown",
    "Ivanova",
    "Mensah",
    "Fischer",
    "Rossi",
    "Cohen",
    "Novak",
    "Chen",
    "Garcia",
    "Okafor",
    "Dubois",
    "Meyer",
    "Singh",
]
CITIES = [
    "Porto",
    "Lagos",
    "Osaka",
    "Oslo",
    "Lima",
    "Denver",
    "Pune",
    "Leeds",
    "Kyiv",
    "Accra",
    "Graz",
    "Quito",
]
PRODUCTS = [
    "desk lamp",
    "water bottle",
    "backpack",
    "keyboard",
    "tea kettle",
    "yoga mat",
    "phone case",
    "coffee grinder",
    "notebook",
    "headphones",
]
CATEGORIES = ["home", "sports", "office", "kitchen", "electronics"]
JOBS = ["nurse", "teacher", "engineer", "chef", "pilot", "designer", "lawyer", "farmer"]
EVENTS = ["Spring Fair", "Jazz Night", "Tech Summit", "Book Club", "Food Festival", "Chess Open"]
DEPTS = ["sales", "research", "finance", "support", "marketing"]
AIRLINES = ["Skyline", "Nordair", "Pacific Wings", "Andes Air"]
WEATHER = ["sunny", "cloudy", "rainy", "windy", "snowy"]
DISTRACTORS = [
    "The weather was pleasant that day.",
    "Nothing else was noted.",
    "This was recorded last week.",
    "Please keep this for your records.",
    "More details may follow.",
]


def _person(r: random.Random) -> dict[str, tuple[Any, str, str]]:
    name = f"{r.choice(FIRST)} {r.choice(LAST)}"
    return {
        "name": (name, "string", "Their name is {}."),
        "age": (r.randint(18, 90), "integer", "They are {} years old."),
        "city": (r.choice(CITIES), "string", "They live in {}."),
        "email": (
            f"{name.split()[0].lower()}.{name.split()[1].lower()}@example.com",
            "string",
            "Their email address is {}.",
        ),
        "occupation": (r.choice(JOBS), "string", "They work as a {}."),
    }


def _product(r: random.Random) -> dict[str, tuple[Any, str, str]]:
    return {
        "name": (r.choice(PRODUCTS), "string", "The product is a {}."),
        "price": (round(r.uniform(3, 300), 2), "number", "It costs {} dollars."),
        "in_stock": (r.choice([True, False]), "boolean", "In stock: {}."),
        "category": (r.choice(CATEGORIES), "string", "It is listed under {}."),
        "rating": (r.randint(1, 5), "integer", "Customers rate it {} out of 5."),
    }


def _event(r: random.Random) -> dict[str, tuple[Any, str, str]]:
    return {
        "title": (r.choice(EVENTS), "string", "The event is called {}."),
        "date": (f"2025-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}", "string", "It takes place on {}."),
        "city": (r.choice(CITIES), "string", "It is held in {}."),
        "attendees": (r.randint(10, 5000), "integer", "About {} people are expected."),
        "free": (r.choice([True, False]), "boolean", "Free entry: {}."),
    }


def _employee(r: random.Random) -> dict[str, tuple[Any, str, str]]:
    return {
        "name": (f"{r.choice(FIRST)} {r.choice(LAST)}", "string", "The employee is {}."),
        "department": (r.choice(DEPTS), "string", "They belong to the {} department."),
        "salary": (r.randrange(30000, 150000, 500), "integer", "Their yearly salary is {}."),
        "start_year": (r.randint(1995, 2025), "integer", "They started in {}."),
        "remote": (r.choice([True, False]), "boolean", "Remote worker: {}."),
    }


def _flight(r: random.Random) -> dict[str, tuple[Any, str, str]]:
    origin, destination = r.sample(CITIES, 2)
    return {
        "airline": (r.choice(AIRLINES), "string", "The flight is operated by {}."),
        "flight_number": (
            f"{r.choice('ABCDEFGH')}{r.choice('KLMNPRST')}{r.randint(100, 999)}",
            "string",
            "The flight number is {}.",
        ),
        "origin": (origin, "string", "It departs from {}."),
        "destination": (destination, "string", "It arrives in {}."),
        "seats_left": (r.randint(0, 60), "integer", "There are {} seats left."),
    }


def _weather(r: random.Random) -> dict[str, tuple[Any, str, str]]:
    return {
        "city": (r.choice(CITIES), "string", "This report is for {}."),
        "temperature_c": (round(r.uniform(-15, 40), 1), "number", "The temperature is {} degrees Celsius."),
        "humidity": (r.randint(10, 100), "integer", "Humidity is {} percent."),
        "condition": (r.choice(WEATHER), "string", "The sky is {}."),
    }


KINDS = {
    "person": _person,
    "product": _product,
    "event": _event,
    "employee": _employee,
    "flight": _flight,
    "weather": _weather,
}


def generate(count: int, seed: int) -> list[Example]:
    """`count` distinct extraction examples."""
    rng = random.Random(seed)
    out: dict[str, Example] = {}
    while len(out) < count:
        kind = rng.choice(sorted(KINDS))
        fields = KINDS[kind](rng)
        chosen = rng.sample(sorted(fields), rng.randint(3, min(5, len(fields))))
        gold = {k: fields[k][0] for k in chosen}
        schema = {
            "type": "object",
            "properties": {k: {"type": fields[k][1]} for k in chosen},
            "required": chosen,
        }
        sentences = [fields[k][2].format(_render(fields[k][0])) for k in chosen]
        rng.shuffle(sentences)
        sentences.insert(rng.randint(0, len(sentences)), rng.choice(DISTRACTORS))
        text = " ".join(sentences)
        user = f"Schema: {json.dumps(schema)}\nText: {text}"
        if user in out:
            continue
        out[user] = chat_example(
            SYSTEM, user, json.dumps(gold), meta={"kind": kind, "gold": gold, "schema": schema}
        )
    return list(out.values())


def _render(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def score(prediction: str, meta: dict[str, Any], data_dir: Any = None) -> bool:
    """Exact match: valid JSON equal to the gold object (numbers compared by value, booleans strictly)."""
    parsed = parse_object(prediction)
    if parsed is None or set(parsed) != set(meta["gold"]):
        return False
    return all(_same(parsed[k], v) for k, v in meta["gold"].items())


def parse_object(text: str) -> dict[str, Any] | None:
    """The JSON object in a model answer (code fences allowed), or None."""
    text = re.sub(r"```(?:json)?", "", text).strip()
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return abs(got - want) < 1e-9
    return got == want
