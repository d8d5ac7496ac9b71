/** The agent's tools on their own: the calculator's parser, read_file's folder, http_get's origin. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CalculatorError, evaluate } from '../src/calculator.mjs';
import { startDemoServer, type DemoServer } from '../src/demo-server.mjs';
import { httpGetTool, listFiles, readFileTool } from '../src/tools.mjs';

describe('calculator', () => {
  it('evaluates arithmetic with the usual precedence', () => {
    const cases: Array<[string, number]> = [
      ['1 + 2 * 3', 7],
      ['(1 + 2) * 3', 9],
      ['2 ^ 3 ^ 2', 512],
      ['2 ** -1', 0.5],
      ['-2 ^ 2', -4],
      ['-(2 + 3) * 4', -20],
      ['10 % 3', 1],
      ['.5 + 1e3 / 4', 250.5],
      ['sqrt(16) + max(1, 2, 3) - abs(-1)', 6],
      ['round(pi * 100) / 100', 3.14],
      ['0.25 * 120 + 0.1 * 200', 50],
    ];
    for (const [text, value] of cases) expect(evaluate(text), text).toBeCloseTo(value, 12);
  });

  it('refuses anything else with the column at fault, and never runs code', () => {
    const cases: Array<[string, RegExp]> = [
      ['', /empty/],
      ['.', /unexpected character "\." at column 1/],
      ['1 +', /ends too early/],
      ['(1', /expected "\)" at the end/],
      ['1 2', /unexpected "2" at column 3/],
      ['1 / 0', /division by zero/],
      ['10 ^ 400', /not a finite number/],
      ['process.exit(1)', /column 8/],
      ['constructor', /unknown name "constructor"/],
      ['toString(1)', /unknown function "toString"/],
      ['__proto__', /unknown name "__proto__"/],
      ['hasOwnProperty(1)', /unknown function "hasOwnProperty"/],
      ['sqrt(1, 2)', /takes 1 argument/],
      ['('.repeat(70) + '1' + ')'.repeat(70), /nests deeper/],
      ['1+'.repeat(150) + '1', /longer than 200/],
    ];
    for (const [text, message] of cases) expect(() => evaluate(text), text).toThrow(CalculatorError), expect(() => evaluate(text), text).toThrow(message);
  });
});

describe('read_file', () => {
  let dir: string;
  let root: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'moeflash-agent-tools-'));
    root = path.join(dir, 'ws');
    fs.mkdirSync(path.join(root, 'sub'), { recursive: true });
    fs.writeFileSync(path.join(root, 'a.txt'), 'alpha');
    fs.writeFileSync(path.join(root, 'sub', 'b.txt'), 'b'.repeat(50));
    fs.writeFileSync(path.join(dir, 'secret.txt'), 'secret');
    fs.symlinkSync(path.join(dir, 'secret.txt'), path.join(root, 'link.txt'));
    fs.symlinkSync(path.join(root, 'a.txt'), path.join(root, 'inner-link.txt'));
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads files inside the folder (links that stay inside too), cut at maxChars', async () => {
    const tool = readFileTool({ root, maxChars: 10 });
    expect(await tool.run({ path: 'a.txt' })).toEqual({ path: 'a.txt', bytes: 5, text: 'alpha', truncated: false });
    expect(await tool.run({ path: './sub/../sub/b.txt' })).toEqual({ path: './sub/../sub/b.txt', bytes: 50, text: 'b'.repeat(10), truncated: true });
    expect(await tool.run({ path: 'inner-link.txt' })).toMatchObject({ text: 'alpha' });
    expect(await listFiles(root)).toEqual(['a.txt', 'sub/b.txt']);
  });

  it('refuses what is outside the folder, missing or not a file, with a message for the model', async () => {
    const tool = readFileTool({ root });
    await expect(tool.run({ path: '../secret.txt' })).rejects.toThrow('"../secret.txt" is outside the workspace folder');
    await expect(tool.run({ path: 'sub/../../secret.txt' })).rejects.toThrow(/outside the workspace folder/);
    await expect(tool.run({ path: path.join(dir, 'secret.txt') })).rejects.toThrow(/absolute paths are not allowed/);
    await expect(tool.run({ path: 'link.txt' })).rejects.toThrow('"link.txt" links outside the workspace folder');
    await expect(tool.run({ path: 'nope.txt' })).rejects.toThrow('no such file: "nope.txt"');
    await expect(tool.run({ path: 'sub' })).rejects.toThrow('"sub" is not a regular file');
    await expect(tool.run({ path: 'a.txt\0' })).rejects.toThrow(/NUL/);
    await expect(tool.run({ path: 7 })).rejects.toThrow('"path" must be a non-empty string; got 7');
  });
});

describe('http_get', () => {
  let srv: DemoServer;
  beforeAll(async () => {
    srv = await startDemoServer();
  });
  afterAll(async () => {
    await srv?.close();
  });

  it('GETs paths of its service and refuses paths that lead to another origin', async () => {
    const tool = httpGetTool({ baseUrl: srv.url });
    expect(await tool.run({ path: '/status' })).toMatchObject({ status: 200, contentType: 'application/json', truncated: false });
    expect(await tool.run({ path: '/missing' })).toMatchObject({ status: 404 });
    await expect(tool.run({ path: '//example.com/x' })).rejects.toThrow(/leads to http:\/\/example\.com; only http:\/\/127\.0\.0\.1:\d+ can be fetched/);
    await expect(tool.run({ path: 'http://169.254.169.254/' })).rejects.toThrow(/leads to http:\/\/169\.254\.169\.254/);
    expect(srv.requests).toEqual([{ method: 'GET', path: '/status' }, { method: 'GET', path: '/missing' }]);
    // A port nothing listens on any more.
    const gone = await startDemoServer();
    await gone.close();
    await expect(httpGetTool({ baseUrl: gone.url, timeoutMs: 500 }).run({ path: '/' })).rejects.toThrow(/GET \/ failed: ECONNREFUSED/);
  });
});
