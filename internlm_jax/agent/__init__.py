"""Agents on InternLM2: typed tools, a sandboxed Python interpreter, the plugin/interpreter agent loop, and
tools served over HTTP (`internlm_jax.agent.tool_server`, imported on demand: it needs FastAPI) and over the
Model Context Protocol (`internlm_jax.agent.mcp`), and our tools as LangChain tools and Lagent actions
(`internlm_jax.agent.adapters`). The MCP and adapter names below load on first use; their libraries are the
optional `agents` extra.

    from internlm_jax.agent import Agent, Toolkit, tool, calculator_tool, PythonInterpreter, MCPToolkit
"""

import importlib
from typing import Any

from internlm_jax.agent.backends import OpenAIChatBackend, PromptBackend, ScriptedBackend
from internlm_jax.agent.builtin import PythonInterpreter, calculator, calculator_tool, file_reader
from internlm_jax.agent.local import LocalBackend
from internlm_jax.agent.loop import Agent, AgentEvent, AgentRun, Backend
from internlm_jax.agent.sandbox import ExecResult, Sandbox, SandboxConfig, SandboxError
from internlm_jax.agent.tools import Tool, ToolError, Toolkit, ToolResult, tool

_LAZY = {"MCPServerThread": "mcp", "MCPToolkit": "mcp", "create_mcp_server": "mcp", "lagent_llm": "adapters",
         "to_lagent": "adapters", "to_lagent_interpreter": "adapters", "to_langchain": "adapters"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"internlm_jax.agent.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'internlm_jax.agent' has no attribute {name!r}")


__all__ = ["Agent", "AgentEvent", "AgentRun", "Backend", "ExecResult", "LocalBackend", "MCPServerThread",
           "MCPToolkit", "OpenAIChatBackend", "PromptBackend", "PythonInterpreter", "Sandbox", "SandboxConfig",
           "SandboxError", "ScriptedBackend", "Tool", "ToolError", "ToolResult", "Toolkit", "calculator",
           "calculator_tool", "create_mcp_server", "file_reader", "lagent_llm", "to_lagent", "to_lagent_interpreter",
           "to_langchain", "tool"]
