"""What a user touches: the command line, the REPL, the chat window, the HTTP server."""
