// Prints the imports and exports of both wasm files: the app and the loader's verifier must each
// link only what their JS glue provides. Usage: node modules.mjs PKG_DIR.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

const pkg = process.argv[2];
const out = {};
for (const name of ['chat_core', 'chat_verify']) {
  const module = await WebAssembly.compile(await readFile(join(pkg, `${name}.wasm`)));
  out[name] = {
    imports: WebAssembly.Module.imports(module).map((i) => `${i.module}.${i.name}`),
    exports: WebAssembly.Module.exports(module).map((e) => e.name),
  };
}
console.log(JSON.stringify(out));
