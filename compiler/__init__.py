"""slimgraph's compiler core: the IR, op table, frontend, interpreter, verifier and pass manager."""
