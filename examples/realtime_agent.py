"""A phone agent on a realtime speech-to-speech model, with tools, barge-in and fallback.

Serve it for real (point your Twilio number's voice webhook at
``https://<public host>/twilio/voice``; set the vendor key, e.g. ``OPENAI_API_KEY``)::

    python examples/realtime_agent.py --provider openai --fallback xai --public-url https://<host>

Try it without a phone, a Twilio account or a vendor key::

    python examples/realtime_agent.py --fake                 # fake OpenAI Realtime
    python examples/realtime_agent.py --fake --provider gemini

``--fake`` starts a local fake of the vendor, serves the app on a free port and dials in with
the caller simulator: the agent greets, the caller asks something, the agent calls a tool
and answers, the caller barges in, and the call ends. Transcripts and the call's outcome
(usage, barge-ins, truncations) are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.realtime import (
    AgentOptions,
    BridgeResult,
    LifecycleHooks,
    ParameterResolver,
    ToolRegistry,
    TranscriptLine,
    end_call_tool,
    run_agent_call,
    transfer_call_tool,
)
from voice_runtime.session import VoiceSession

INSTRUCTIONS = (
    "You are the phone assistant of ACME Parcel. Be brief and friendly. "
    "Use lookup_order to find an order. If the caller wants a human, use transfer_call. "
    "When the caller is done, say goodbye and use end_call."
)
GREETING = "Thanks for calling ACME Parcel. How can I help?"

tools = ToolRegistry([end_call_tool(), transfer_call_tool({"support": "+15550100199"})])


@tools.tool(
    parameters={
        "type": "object",
        "properties": {"order_id": {"type": "string", "description": "the order number"}},
        "required": ["order_id"],
    }
)
async def lookup_order(order_id: str) -> dict[str, str]:
    """Find an order by its number and say where it is."""
    await asyncio.sleep(0.05)  # a database or API call in a real app
    return {"order_id": order_id, "status": "out for delivery", "eta": "today 14-16"}


def print_transcript(line: TranscriptLine) -> None:
    """Show final transcript lines as they arrive."""
    if line.final and line.text:
        print(f"  {line.role:>9}: {line.text}")


def log_usage(report: Any) -> None:
    """Per-response token usage, normalised across vendors."""
    u = report.usage
    print(f"  [usage] +{u.input_tokens} in / +{u.output_tokens} out ({report.provider})")


hooks = LifecycleHooks(
    on_usage=log_usage,
    on_session_started=lambda s: print(f"  [agent] {s.provider} session started"),
    on_session_stopped=lambda s: print(
        f"  [agent] stopped after {s.duration_s:.1f}s ({s.reason}), {s.usage.total_tokens} tokens"
    ),
)


def make_resolver(
    providers: list[str], provider_kwargs: dict[str, dict[str, Any]] | None = None
) -> ParameterResolver:
    """Per call: defaults, plus the stream's <Parameter>s where allowed."""
    return ParameterResolver(
        providers=providers,
        options=AgentOptions(instructions=INSTRUCTIONS, greeting=GREETING),
        tools=tools,
        allowed_providers=set(providers),
        provider_kwargs=provider_kwargs,
    )


def serve(args: argparse.Namespace) -> None:
    """Serve real calls until interrupted."""
    from voice_runtime import VoiceServer
    from voice_runtime.serving import serve_forever

    resolver = make_resolver([args.provider, *args.fallback])

    async def handle_call(session: VoiceSession) -> None:
        result = await run_agent_call(
            session, resolver, hooks=hooks, on_transcript=print_transcript
        )
        print(f"call {session.call_sid} ended: {result.reason}")

    voice = VoiceServer(on_call=handle_call, public_url=args.public_url)
    serve_forever(voice, host=args.host, port=args.port)


# --------------------------------------------------------------------------- the fake far end


def fake_vendor(provider: str) -> Any:
    """A fake of ``provider`` scripted for the demo call."""
    from voice_runtime.testing import fake_realtime as fr

    script = fr.FakeScript(
        greeting=fr.tone_response(
            1200, freq=440.0, transcript=GREETING, usage={"input_text": 60, "output_audio": 90}
        ),
        replies=[
            fr.FakeResponse(tool_call=("lookup_order", {"order_id": "A-1042"})),
            fr.tone_response(600, freq=520.0, transcript="Anything else?"),
        ],
        after_tool=fr.tone_response(
            2500,
            freq=480.0,
            transcript="Order A-1042 arrives today between two and four.",
            usage={"input_audio": 40, "input_text": 80, "output_audio": 180, "output_text": 20},
        ),
        user_transcript="Where is my order A-1042?",
    )
    classes = {
        "openai": fr.FakeOpenAIRealtime,
        "xai": fr.FakeXaiRealtime,
        "gemini": fr.FakeGeminiLive,
        "elevenlabs": fr.FakeElevenLabsAgent,
    }
    return classes[provider](script)


async def demo(provider: str) -> BridgeResult:
    """One simulated call against a fake vendor, printed as it happens."""
    from voice_runtime import CallerSimulator, VoiceServer
    from voice_runtime.testing import serve_in_loop

    caller_speech = tone_ulaw(300.0, 600.0, -12.0)  # stands in for "Where is my order?"
    async with fake_vendor(provider) as fake:
        kwargs: dict[str, Any] = {"api_key": fake.api_key, "options": None}
        options = AgentOptions(instructions=INSTRUCTIONS, greeting=GREETING, base_url=fake.base_url)
        kwargs["options"] = options.replace(tools=tools.specs())
        if provider == "elevenlabs":
            kwargs["agent_id"] = fake.agent_id
        resolver = make_resolver([provider], {provider: kwargs})
        outcome: asyncio.Future[BridgeResult] = asyncio.get_running_loop().create_future()

        async def handle_call(session: VoiceSession) -> None:
            outcome.set_result(
                await run_agent_call(session, resolver, hooks=hooks, on_transcript=print_transcript)
            )

        voice = VoiceServer(on_call=handle_call)
        async with serve_in_loop(voice.app) as srv:
            print(f"caller dials in (fake {provider})")
            async with CallerSimulator(srv.ws_url + "/voice") as caller:
                await caller.wait_for_heard(1200, timeout=10)  # the whole greeting
                print("  [caller] asks about an order")
                await caller.send_audio(caller_speech)
                await caller.send_audio(silence_ulaw(500))
                await caller.wait_for_heard(1200 + 800, timeout=10)
                print("  [caller] interrupts the answer")
                await caller.send_audio(caller_speech)
                await caller.send_audio(silence_ulaw(500))
                await caller.wait_idle(0.5, timeout=10)
                print(
                    f"  [caller] heard {caller.heard_ms:.0f} ms of agent audio, "
                    f"{caller.clears} clear(s)"
                )
            result = await asyncio.wait_for(outcome, 10)
    print(
        f"result: {result.reason}, {result.barge_ins} barge-in(s), "
        f"truncations {[t.audio_end_ms for t in result.truncations]}, "
        f"{result.tool_calls} tool call(s), usage {result.usage.as_dict()}"
    )
    return result


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="A realtime voice agent on Twilio calls")
    parser.add_argument(
        "--provider", default="openai", choices=["openai", "xai", "gemini", "elevenlabs"]
    )
    parser.add_argument("--fallback", nargs="*", default=[], help="providers to try next")
    parser.add_argument("--fake", action="store_true", help="run one call against a local fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--public-url", default=None, help="https:// base URL Twilio reaches")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    if args.fake:
        asyncio.run(demo(args.provider))
    else:
        serve(args)


if __name__ == "__main__":
    main()
