"""Runs SQL statements in chdb (a current ClickHouse engine, in process), in one session.

    python chdb_run.py STATEMENTS.json

The file holds a JSON list of statements. Prints a JSON list with, for each, either
{"data": [[...], ...]} (the rows, JSONCompact) or {"error": "..."}. The engine's tests call it
and check the results; it judges nothing itself.
"""
import json
import sys

from chdb import session


def main() -> None:
    with open(sys.argv[1]) as f:
        statements = json.load(f)
    s = session.Session()
    out = []
    for sql in statements:
        try:
            text = str(s.query(sql, "JSONCompact")).strip()
            out.append({"data": json.loads(text)["data"] if text else []})
        except Exception as e:  # report it; the caller decides
            out.append({"error": str(e)})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
