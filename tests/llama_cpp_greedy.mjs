// llama.cpp's own reading of a GGUF file, for tests/test_llama_cpp.py: node-llama-cpp's prebuilt CPU build of
// llama.cpp (the engine Ollama runs) tokenizes the prompt on stdin (special tokens parsed) and continues it
// greedily.  usage: node llama_cpp_greedy.mjs NODE_LLAMA_CPP_INDEX_JS MODEL.gguf NEW_TOKENS < prompt
// prints {"tokens": [prompt ids], "out": [new ids]}
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";

const [entry, modelPath, newTokens] = process.argv.slice(2);
const {getLlama} = await import(pathToFileURL(entry).href);
const text = readFileSync(0, "utf8");
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath});
const tokens = model.tokenize(text, true);
const context = await model.createContext({contextSize: 512, threads: 2});
const out = [];
for await (const token of context.getSequence().evaluate(tokens, {temperature: 0})) {
    out.push(token);
    if (out.length >= Number(newTokens) || model.isEogToken(token)) break;
}
console.log(JSON.stringify({tokens, out}));
process.exit(0);
