"""The load-test client, run as a script in its own process by `cookbook.loadtest.run_client`: it imports only
httpx and the standard library (not the cookbook package, so it starts in a fraction of a second).

stdin: JSON {"url", "bodies": [request JSON], "at_s": [send times, s after start], "deadline_s"}.
stdout: JSON list, one answer per body, in order: {"status", "json", "retry_after", "sent_s", "done_s"} ("json" is
{"detail": text} when the reply was not JSON), or {"status": null, "error"} for a request that got no answer (a
connection error, or the deadline passed).
Open loop: each request is sent at its time whether or not earlier ones were answered.
"""

import asyncio
import json
import sys
import time


async def send_all(url: str, bodies: list, at_s: list, deadline_s: float) -> list:
    import httpx

    t0 = time.perf_counter()

    async def one(client, i: int) -> dict:
        await asyncio.sleep(max(0.0, at_s[i] - (time.perf_counter() - t0)))
        sent = time.perf_counter() - t0
        try:
            resp = await client.post(url + "/generate", json=bodies[i], timeout=deadline_s)
        except httpx.HTTPError as exc:
            return {"status": None, "error": f"{type(exc).__name__}: {exc}", "sent_s": sent}
        try:
            body = resp.json()
        except ValueError:  # e.g. a plain-text 500 page: keep what it said
            body = {"detail": resp.text[:500]}
        return {"status": resp.status_code, "json": body, "retry_after": resp.headers.get("Retry-After"),
                "sent_s": sent, "done_s": time.perf_counter() - t0}

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(len(bodies))]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for t in pending:
            t.cancel()
        return [t.result() if t in done else {"status": None, "error": f"no answer within {deadline_s} s"}
                for t in tasks]


def main() -> None:
    job = json.load(sys.stdin)
    answers = asyncio.run(send_all(job["url"], job["bodies"], job["at_s"], job["deadline_s"]))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
