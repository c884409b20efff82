"""The plain reference: openai.AsyncOpenAI + aiolimiter.AsyncLimiter + asyncio.gather, nothing else.

What a careful user writes in ~40 lines: one SDK client (default SDK retries), a limiter set to the
key's rpm, a semaphore bounding requests in flight, and gather over the prompts.
``python bench/plain_reference.py BASE_URL N [RPM] [CONCURRENCY] [PERIOD] [OFFSET]`` prints one JSON
line. ``PERIOD`` is the limiter's time period: ``AsyncLimiter(rpm/60 * PERIOD, PERIOD)``; 60 is the
per-minute recipe, 1 the careful per-second one (B1's fair peers). ``OFFSET`` numbers the prompts
(several processes send different prompts).
"""

import asyncio
import json
import os
import sys
import time

import openai
from aiolimiter import AsyncLimiter


async def run(base_url: str, n: int, rpm: float | None = None, concurrency: int = 64, period: float = 60.0,
              offset: int = 0) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "sk-x"))
    limiter = AsyncLimiter(rpm / 60.0 * period, period) if rpm else None
    sem = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            if limiter is not None:
                await limiter.acquire()
            try:
                await client.chat.completions.create(
                    model="fake-model", max_tokens=256, temperature=0.0,
                    messages=[{"role": "user", "content": f"Rate the answer to question {offset + i} on a scale of 0 to 5."}])
            except openai.APIError:
                failed += 1  # retries exhausted (the SDK retries 429/5xx twice by default)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"n": n, "failed": failed, "wall_s": wall, "req_per_s": n / wall}


if __name__ == "__main__":
    url, n = sys.argv[1], int(sys.argv[2])
    rpm = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "none" else None
    conc = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    period = float(sys.argv[5]) if len(sys.argv) > 5 else 60.0
    offset = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    print(json.dumps(asyncio.run(run(url, n, rpm, conc, period, offset))), flush=True)
