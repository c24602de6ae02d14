"""Hooks that exist only when pytest-xdist is active (controller side)."""

from __future__ import annotations

from typing import Any

import pytest

from .._controller import RunController


class XdistHooks:
    """Hands every worker the run's facts, so they all agree on them."""

    def __init__(self, controller: RunController) -> None:
        self.controller = controller

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput.update(self.controller.workerinput())
