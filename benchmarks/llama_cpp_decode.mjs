// llama.cpp's side of benchmarks/decode_vs_llama_cpp.py: node-llama-cpp's prebuilt CPU build of llama.cpp (the
// engine Ollama runs) decodes greedily from the given prompt ids in `batch` sequences at once, never stopping at
// end-of-text, and reports when each sequence produced its first and last token.
// usage: node llama_cpp_decode.mjs NODE_LLAMA_CPP_INDEX_JS MODEL.gguf < {"tokens": [...], "new_tokens": N,
//        "batch": B, "threads": T, "rounds": R}
// prints {"rounds": [{"start": s, "first": [s...], "last": [s...]}...], "out": [ids of sequence 0, last round]}
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";

const [entry, modelPath] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(0, "utf8"));
const {getLlama} = await import(pathToFileURL(entry).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: spec.threads});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({
    contextSize: spec.tokens.length + spec.new_tokens + 8,
    sequences: spec.batch,
    threads: {ideal: spec.threads, min: spec.threads},
});
const sequences = Array.from({length: spec.batch}, () => context.getSequence());
const now = () => Number(process.hrtime.bigint()) / 1e9;

async function decode(sequence, result, i) {
    const out = [];
    for await (const token of sequence.evaluate(spec.tokens, {temperature: 0})) {
        out.push(token);
        if (out.length === 1) result.first[i] = now();
        if (out.length >= spec.new_tokens) break;
    }
    result.last[i] = now();
    return out;
}

const rounds = [];
let out = [];
for (let r = 0; r < spec.rounds; r++) {
    await Promise.all(sequences.map((s) => s.clearHistory()));
    const result = {start: now(), first: [], last: []};
    const outs = await Promise.all(sequences.map((s, i) => decode(s, result, i)));
    rounds.push(result);
    out = outs[0];
}
console.log(JSON.stringify({rounds, out}));
process.exit(0);
