"""Tests of the IR (compiler/ir, compiler/ops) and the torch frontend (compiler/frontend)."""
