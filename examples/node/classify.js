#!/usr/bin/env node
// Classify texts with a savpack bundle from Node.js: onnxruntime-node runs the bundle's graph, whose outputs are each
// pack's votes, label and class probabilities; the `tokenizers` package (Hugging Face's Rust tokenizers, the library
// the Python runtime uses) reads the bundle's tokenizer.json. No Python, no vote or calibration to reimplement.
//
//   node classify.js BUNDLE ITEMS.jsonl [--batch-size 8] [--threads N] [--abstain-below P]
//
// ITEMS.jsonl: one JSON object per line with `text` (or `question`). Prints one JSON line per item, the record
// `savpack-run classify --json` prints: source, label, votes, shares, probabilities, calibrated, abstained (of the
// first pack), and `packs` with every pack's when the bundle holds several. --abstain-below P withholds the label
// (null, abstained true) where the top probability is below P. Text bundles only (graph kinds "text" and "bert");
// bundle format 2 with the probabilities in the graph (exported by savpack since they moved there).
//
// The steps are the Python runtime's (savpack_runtime.preprocess, batching, graph_inputs), in short:
//   prompt = before_images + after_images of preprocess.json's render rule, with {text} replaced by the item's text;
//   token ids from tokenizer.json (special tokens as text.add_special_tokens says), padded with text.pad_id on
//   text.padding_side; items grouped into batches by token count; the graph's inputs as bundle.json lists them.

import { createHash } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";

import ort from "onnxruntime-node";
import { Tokenizer } from "tokenizers";

const TEXT_KINDS = ["text", "bert"];
const TEXT_PLACEHOLDER = "{text}";

class UserError extends Error {}

function readJson(path, what) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new UserError(`${path}: cannot read ${what} (${error.code || error.message})`);
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new UserError(`${path}: ${what} is not valid JSON (${error.message})`);
  }
}

function sha256(path) {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

// bundle.json, checked as far as this client relies on it: format 2 (the vote in the graph) with each pack's
// probabilities among the graph's outputs, a text graph, the files it names unaltered.
function loadBundle(folder) {
  const info = readJson(join(folder, "bundle.json"), "bundle.json");
  if (info.format !== "savpack-bundle") throw new UserError(`${folder}: not a savpack bundle (format ${JSON.stringify(info.format)})`);
  if (info.format_version !== 2) {
    throw new UserError(`${folder}: bundle format ${info.format_version}; this client reads format 2, whose graph votes (export again with savpack export)`);
  }
  const older = info.packs.filter((pack) => !pack.outputs.probabilities || typeof pack.calibrated !== "boolean");
  if (older.length) {
    throw new UserError(`${folder}: pack ${JSON.stringify(older[0].name)} has no probabilities in the graph (a bundle exported before they moved there); export it again with savpack export`);
  }
  if (!TEXT_KINDS.includes(info.graph.kind)) {
    throw new UserError(`${folder}: graph kind ${JSON.stringify(info.graph.kind)}; this example classifies text bundles (${TEXT_KINDS.join(", ")})`);
  }
  const files = { [info.graph.file]: info.graph.sha256, ...info.preprocessing.files };
  for (const [name, digest] of Object.entries(files)) {
    if (sha256(join(folder, name)) !== digest) throw new UserError(`${folder}: ${name} does not match its sha256 in bundle.json`);
  }
  const weights = statSync(join(folder, info.graph.data_file));
  if (weights.size !== info.graph.data_bytes) throw new UserError(`${folder}: ${info.graph.data_file} is ${weights.size} bytes, bundle.json says ${info.graph.data_bytes}`);
  return info;
}

function readItems(path) {
  const lines = readFileSync(path, "utf8").split("\n");
  const items = [];
  lines.forEach((line, index) => {
    if (!line.trim()) return;
    let record;
    try {
      record = JSON.parse(line);
    } catch (error) {
      throw new UserError(`${path}:${index + 1}: not valid JSON (${error.message})`);
    }
    const text = record.text ?? record.question;
    if (typeof text !== "string") throw new UserError(`${path}:${index + 1}: needs a "text" (or "question") string`);
    if (!text) throw new UserError(`${path}:${index + 1}: has neither text nor images`);
    const media = ["image", "images", "video", "videos"].filter((key) => record[key] && record[key].length !== 0);
    if (media.length) throw new UserError(`${path}:${index + 1}: images and videos are not supported by this example`);
    items.push({ source: `${path}:${index + 1}`, text });
  });
  return items;
}

// Token id rows padded to one length on `side`: [ids, mask], each a flat BigInt64Array of rows x length.
function pad(rows, padId, side) {
  const length = Math.max(...rows.map((row) => row.length));
  const ids = new BigInt64Array(rows.length * length).fill(BigInt(padId));
  const mask = new BigInt64Array(rows.length * length);
  rows.forEach((row, r) => {
    const start = r * length + (side === "left" ? length - row.length : 0);
    row.forEach((value, i) => {
      ids[start + i] = BigInt(value);
      mask[start + i] = 1n;
    });
  });
  return { ids, mask, length };
}

// As savpack's records round them (savpack_runtime.result).
const round = (value, decimals) => Math.round(value * 10 ** decimals) / 10 ** decimals;

async function classify(folder, items, batchSize, threads, abstainBelow) {
  const info = loadBundle(folder);
  const spec = readJson(join(folder, "preprocess.json"), "preprocess.json");
  const tokenizer = Tokenizer.fromFile(join(folder, "tokenizer.json"));
  const options = { graphOptimizationLevel: "all", ...(threads ? { intraOpNumThreads: threads, interOpNumThreads: 1 } : {}) };
  const session = await ort.InferenceSession.create(join(folder, info.graph.file), options);

  const template = spec.render.before_images + spec.render.after_images;
  const prompts = items.map((item) => template.split(TEXT_PLACEHOLDER).join(item.text));
  // As the runtime batches: ordered by token count (no special tokens), then cut into batches.
  const counts = (await tokenizer.encodeBatch(prompts, { addSpecialTokens: false })).map((encoding) => encoding.getIds().length);
  const order = items.map((_, i) => i).sort((a, b) => counts[a] - counts[b] || a - b);
  const results = new Array(items.length);
  for (let start = 0; start < order.length; start += batchSize) {
    const batch = order.slice(start, start + batchSize);
    const encodings = await tokenizer.encodeBatch(batch.map((i) => prompts[i]), { addSpecialTokens: spec.text.add_special_tokens });
    const rows = encodings.map((encoding) => encoding.getIds());
    rows.forEach((row, r) => {
      if (spec.text.max_positions && row.length > spec.text.max_positions) {
        throw new UserError(`${items[batch[r]].source}: prompt is ${row.length} tokens, longer than the model's context of ${spec.text.max_positions}`);
      }
    });
    const { ids, mask, length } = pad(rows, spec.text.pad_id, spec.text.padding_side);
    const shape = [batch.length, length];
    const tensors = { input_ids: new ort.Tensor("int64", ids, shape), attention_mask: new ort.Tensor("int64", mask, shape) };
    if (info.graph.inputs.includes("token_type_ids")) {
      const types = pad(encodings.map((encoding) => encoding.getTypeIds()), 0, spec.text.padding_side).ids;
      tensors.token_type_ids = new ort.Tensor("int64", types, shape);
    }
    const feed = Object.fromEntries(info.graph.inputs.map((name) => [name, tensors[name]]));
    const outputs = await session.run(feed);
    batch.forEach((item, row) => {
      const byPack = {};
      for (const pack of info.packs) {
        const classes = pack.labels.length;
        const slice = (role) => Array.from(outputs[pack.outputs[role]].data.slice(row * classes, (row + 1) * classes), Number);
        const votes = slice("votes");
        const probabilities = slice("probabilities"); // calibrated; a format-1 pack's are its vote shares
        const heads = votes.reduce((sum, count) => sum + count, 0);
        const abstained = abstainBelow !== null && Math.max(...probabilities) < abstainBelow;
        byPack[pack.name] = {
          label: abstained ? null : pack.labels[Number(outputs[pack.outputs.prediction].data[row])],
          votes: Object.fromEntries(pack.labels.map((label, c) => [label, votes[c]])),
          shares: Object.fromEntries(pack.labels.map((label, c) => [label, round(votes[c] / heads, 6)])),
          probabilities: Object.fromEntries(pack.labels.map((label, c) => [label, round(probabilities[c], 7)])),
          calibrated: pack.calibrated,
          abstained,
        };
      }
      const first = byPack[info.packs[0].name];
      results[item] = { source: items[item].source, ...first, ...(info.packs.length > 1 ? { packs: byPack } : {}) };
    });
  }
  return results;
}

const USAGE = "usage: node classify.js BUNDLE ITEMS.jsonl [--batch-size 8] [--threads N] [--abstain-below P]";

function parseArgs(argv) {
  const positional = [];
  const options = { batchSize: 8, threads: 0, abstainBelow: null };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--abstain-below") {
      const value = Number(argv[++i]);
      if (argv[i] === undefined || argv[i].trim() === "" || !(value >= 0 && value <= 1)) throw new UserError("--abstain-below needs a probability from 0 to 1");
      options.abstainBelow = value;
    } else if (argv[i] === "--batch-size" || argv[i] === "--threads") {
      const value = Number(argv[++i]);
      if (!Number.isInteger(value) || value < (argv[i - 1] === "--threads" ? 0 : 1)) throw new UserError(`${argv[i - 1]} needs a positive integer`);
      options[argv[i - 1] === "--threads" ? "threads" : "batchSize"] = value;
    } else if (argv[i] === "-h" || argv[i] === "--help") {
      console.log(USAGE);
      process.exit(0);
    } else {
      positional.push(argv[i]);
    }
  }
  if (positional.length !== 2) throw new UserError(USAGE);
  return { bundle: positional[0], items: positional[1], ...options };
}

try {
  const args = parseArgs(process.argv.slice(2));
  const results = await classify(args.bundle, readItems(args.items), args.batchSize, args.threads, args.abstainBelow);
  for (const result of results) console.log(JSON.stringify(result));
} catch (error) {
  if (!(error instanceof UserError)) throw error;
  console.error(`error: ${error.message}`);
  process.exit(1);
}
