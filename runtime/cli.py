"""The `ember` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from runtime.sampling_params import SamplingParams


def _generate(args: argparse.Namespace) -> int:
    from runtime.llm import LLM

    print(f"loading {args.model} ...", file=sys.stderr)
    llm = LLM(args.model, max_model_len=args.max_model_len)
    engine = llm.engine
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer, so no chat template")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    history: list[dict[str, Any]] = []
    interactive = args.prompt is None
    if interactive:
        print("Ember interactive generation. Type a message; /reset clears the chat, /quit leaves.", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("you> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                history.clear()
                continue
            if not line:
                continue
        else:
            line = args.prompt
        history.append({"role": "user", "content": line})
        prompt = list(tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False))
        req = engine.add_request(prompt, params)
        print("ember> " if interactive else "", end="", flush=True)
        text = ""
        while engine.has_unfinished:
            for out in engine.step():
                if out.request_id == req.request_id:
                    print(out.delta_text, end="", flush=True)
                    text = out.text
                    if out.finished:
                        print(f"\n[{len(out.token_ids)} tokens, {out.num_cached_tokens} prompt tokens cached, {out.finish_reason}]", file=sys.stderr)
        print()
        history.append({"role": "assistant", "content": text})
        if not interactive:
            return 0


def _serve(args: argparse.Namespace) -> int:
    import json
    import logging

    import uvicorn

    from runtime.async_engine import AsyncEngine
    from runtime.engine import LLMEngine
    from runtime.llm import build_config
    from runtime.server.app import ServerConfig, ServerState, create_app
    from runtime.session_engine import SessionEngine
    from sessions.manager import SessionManager
    from sessions.store import MemoryStore, RedisSessionStore, SessionStore
    from tools.parsers import parser_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ember.serve")
    keys = json.loads(open(args.api_keys).read()) if args.api_keys else None
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if keys is None:
        if not loopback and not args.allow_open:
            raise ValueError(f"refusing to serve without API keys on {args.host}: pass --api-keys FILE, or --allow-open")
        log.warning("NO API KEYS CONFIGURED: the server is OPEN to anyone who can reach %s:%d", args.host, args.port)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {"redis_url": args.redis, "host_cache_gib": args.host_cache_gib,
                                 "max_model_len": args.max_model_len, "device": device, "dtype": args.dtype,
                                 "enforce_eager": args.enforce_eager, "max_num_seqs": args.max_num_seqs}
    if args.num_blocks:
        overrides["num_blocks"] = args.num_blocks
    else:
        overrides["kv_cache_gib"] = args.kv_cache_gib
    engine = LLMEngine(build_config(args.model, **overrides))
    store: SessionStore = RedisSessionStore(args.redis) if args.redis else MemoryStore()
    if not args.redis:
        log.warning("no --redis: sessions live in this process's memory and end with it")
    manager = SessionManager(store=store)
    recovered = manager.recover()
    if recovered:
        log.info("recovered %d sessions from Redis", len(recovered))
    fmt = args.parser or parser_for(engine.model_id)
    se = SessionEngine(engine, manager, tool_format=fmt, max_item_tokens=args.max_item_tokens)
    state = ServerState(AsyncEngine(engine), se, ServerConfig(
        model_id=engine.model_id, api_keys=keys, parser_format=fmt,
        send_queue_events=args.send_queue_events, max_frame_bytes=args.max_frame_bytes))
    if args.tools:
        from runtime.server.hooks import ServerTools, load_tools

        state.tools = ServerTools(load_tools(args.tools), timeout_s=args.tool_timeout, max_rounds=args.max_tool_rounds)
        log.info("server-side tools: %s", ", ".join(state.tools.tools))
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning",
                ws_max_size=4 * state.cfg.max_frame_bytes)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import threading
    import urllib.request

    from tools import protocol as P
    from tools.client import SessionClient

    url = args.url
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if url is None:
        # No server given: serve the embedded model in this process, on a free loopback port.
        import socket

        import uvicorn

        from runtime.async_engine import AsyncEngine
        from runtime.llm import LLM
        from runtime.server.app import ServerConfig, ServerState, create_app
        from runtime.session_engine import SessionEngine
        from tools.parsers import parser_for

        print(f"starting an in-process server on {args.model} ...", file=sys.stderr)
        engine = LLM(args.model).engine
        fmt = parser_for(engine.model_id)
        state = ServerState(AsyncEngine(engine), SessionEngine(engine, tool_format=fmt),
                            ServerConfig(model_id=engine.model_id, parser_format=fmt))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            import time

            time.sleep(0.05)
        url = f"127.0.0.1:{port}"

    def list_sessions() -> list[dict[str, Any]]:
        req = urllib.request.Request(f"http://{url}/v1/sessions", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return list(json.loads(r.read())["data"])

    async def attach(session_id: str | None) -> SessionClient:
        c = SessionClient(f"ws://{url}/v1/ws", args.api_key, session_id)
        info = await c.connect()
        print(f"session: {info.id} (state {info.state}, last seq {info.last_seq})", flush=True)
        return c

    async def repl() -> None:
        client = await attach(args.session)
        print("Type a message. Commands: /fork, /list, /resume ID, /quit", file=sys.stderr)
        while True:
            try:
                line = (await asyncio.to_thread(input, "you> ")).strip()
            except EOFError:
                break
            if not line:
                continue
            if line == "/quit":
                break
            if line == "/fork":
                child = await client.fork()
                await client.close()
                client = child
                print(f"forked: now in {client.session_id}", flush=True)
                continue
            if line == "/list":
                for s in list_sessions():
                    mark = "*" if s["id"] == client.session_id else " "
                    print(f"{mark} {s['id']} state={s['state']} last_seq={s['last_seq']}", flush=True)
                continue
            if line.startswith("/resume"):
                target = line.split(maxsplit=1)[1] if " " in line else ""
                try:
                    new = await attach(target)
                except Exception as e:
                    print(f"cannot resume {target!r}: {e}", flush=True)
                    continue
                await client.close()
                client = new
                continue
            await client.send_message(line)
            print("ember> ", end="", flush=True)
            async for ev in client.respond(temperature=args.temperature, max_output_tokens=args.max_tokens):
                if isinstance(ev, P.OutputTextDelta):
                    print(ev.delta, end="", flush=True)
                elif isinstance(ev, P.ArgumentsDone):
                    print(f"\n[tool call] {ev.name}({ev.arguments})", flush=True)
                elif isinstance(ev, P.ToolExecutionDone):
                    print(f"[tool result] {ev.name} -> {ev.output}{' (error)' if ev.is_error else ''}", flush=True)
                elif isinstance(ev, P.ResponseDone):
                    u = ev.response.usage
                    print(f"\n[{ev.response.status}: {u.output_tokens} tokens, "
                          f"{u.input_token_details.cached_tokens}/{u.input_tokens} prompt tokens cached]", flush=True)
        await client.close()

    asyncio.run(repl())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: an inference runtime for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="interactive generation on a model, in this process")
    g.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or a Hugging Face directory")
    g.add_argument("--prompt", help="generate once for this prompt and exit")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    sv = sub.add_parser("serve", help="serve the WebSocket session API and the HTTP API")
    sv.add_argument("--model", default="smollm2-135m")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--redis", default=None, help="redis://host:port/db or redis+cluster://host:port")
    sv.add_argument("--api-keys", default=None, help="a JSON file mapping API key to tenant")
    sv.add_argument("--allow-open", action="store_true", help="serve without keys on a non-loopback address")
    sv.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    sv.add_argument("--dtype", default="auto", help="auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16, float32")
    sv.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    sv.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    sv.add_argument("--kv-cache-gib", type=float, default=1.0)
    sv.add_argument("--num-blocks", type=int, default=None)
    sv.add_argument("--host-cache-gib", type=float, default=2.0)
    sv.add_argument("--max-model-len", type=int, default=None)
    sv.add_argument("--parser", default=None, help="tool-call format: hermes, smollm2, llama3_json")
    sv.add_argument("--tools", default=None, help="module:attr of @tool functions the server runs itself")
    sv.add_argument("--tool-timeout", type=float, default=30.0, help="seconds a server-side tool may take")
    sv.add_argument("--max-tool-rounds", type=int, default=4, help="tool rounds within one response")
    sv.add_argument("--send-queue-events", type=int, default=1024, help="per-connection event queue bound")
    sv.add_argument("--max-item-tokens", type=int, default=32_768, help="largest conversation item accepted")
    sv.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="largest client frame accepted")
    ch = sub.add_parser("chat", help="chat over a session with a server (or one started in this process)")
    ch.add_argument("--url", default=None, help="host:port of `ember serve` (default: serve in-process)")
    ch.add_argument("--api-key", default=None)
    ch.add_argument("--session", default=None, help="resume this session id")
    ch.add_argument("--model", default="smollm2-135m", help="for the in-process server")
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "chat":
            return _chat(args)
        return _serve(args) if args.command == "serve" else _generate(args)
    except ValueError as e:
        print(f"ember: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
