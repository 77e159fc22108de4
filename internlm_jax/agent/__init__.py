"""Agents on InternLM2: typed tools, a sandboxed Python interpreter, the plugin/interpreter agent loop, and
tools served over HTTP (`internlm_jax.agent.tool_server`, imported on demand: it needs FastAPI).

    from internlm_jax.agent import Agent, Toolkit, tool, calculator_tool, PythonInterpreter
"""

from internlm_jax.agent.backends import OpenAIChatBackend, PromptBackend, ScriptedBackend
from internlm_jax.agent.builtin import PythonInterpreter, calculator, calculator_tool, file_reader
from internlm_jax.agent.local import LocalBackend
from internlm_jax.agent.loop import Agent, AgentEvent, AgentRun, Backend
from internlm_jax.agent.sandbox import ExecResult, Sandbox, SandboxConfig, SandboxError
from internlm_jax.agent.tools import Tool, ToolError, Toolkit, ToolResult, tool

__all__ = ["Agent", "AgentEvent", "AgentRun", "Backend", "ExecResult", "LocalBackend", "OpenAIChatBackend",
           "PromptBackend", "PythonInterpreter", "Sandbox", "SandboxConfig", "SandboxError", "ScriptedBackend", "Tool",
           "ToolError", "ToolResult", "Toolkit", "calculator", "calculator_tool", "file_reader", "tool"]
