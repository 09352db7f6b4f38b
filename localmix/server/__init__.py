"""`localmix serve`: the planned model behind OpenAI's chat-completions API. api.py translates OpenAI's JSON
to localmix values and back (pure), engine.py answers one request with a loaded backend (blocking), and
app.py is the HTTP side (Starlette): one generation at a time, a bounded queue, cancellation."""
