"""`draftapprox serve --upstream URL`: a proxy in front of another engine (vLLM, SGLang, llama.cpp) that cuts long
prompt text on the draft and passes everything else through.

A request is the engine's to judge: the proxy consumes only its own `draftapprox` field and the text it cuts, and
relays the engine's answer (tool calls, log-probabilities, several choices, its errors) as it came, adding its record
and the whole prompt's count. Structure (tool definitions and calls, system prompts, role markers) is never cut.
The proxy starts before its engine and follows it going down and coming back (`link`), and a compression that fails
or stalls sends the prompt uncut (`compressor`). Our own server (`serve.app`) keeps its strict schema instead.
"""
