// A Node client built only from the generated TypeScript stubs (build/stubs/typescript): it lists
// agents, streams a query, reads a file and provokes two errors through a running control plane, over
// TLS with a bearer token, and prints what it saw as one JSON document (tests/test_interop_node.py).
//
// Inputs (environment): ONPREM_ADDRESS (host:port of the operator API), ONPREM_CA_FILE (PEM of the
// control plane's CA), ONPREM_TOKEN (operator bearer token), ONPREM_GROUP, ONPREM_DATABASE_PROFILE,
// ONPREM_SQL, ONPREM_FOLDER_PROFILE, ONPREM_FILE_PATH, ONPREM_FOREIGN_GROUP (a group the token may not use).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";

import { ChannelCredentials, Metadata, ServiceError } from "@grpc/grpc-js";

import { Any } from "../../../build/stubs/typescript/google/protobuf/any";
import { BadRequest, ErrorInfo } from "../../../build/stubs/typescript/google/rpc/error_details";
import { Status } from "../../../build/stubs/typescript/google/rpc/status";
import {
  AgentServiceClient,
  agentStateToJSON,
  ListAgentsResponse,
} from "../../../build/stubs/typescript/onprem/v1/agents";
import {
  DatabaseServiceClient,
  QueryRequest,
  QueryResponse,
} from "../../../build/stubs/typescript/onprem/v1/database";
import { FileServiceClient, ReadResponse } from "../../../build/stubs/typescript/onprem/v1/files";
import { profileKindToJSON } from "../../../build/stubs/typescript/onprem/v1/profiles";
import { ColumnValues, ValueType, valueTypeToJSON } from "../../../build/stubs/typescript/onprem/v1/values";

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

const address = env("ONPREM_ADDRESS");
const credentials = ChannelCredentials.createSsl(readFileSync(env("ONPREM_CA_FILE")));
const metadata = new Metadata();
metadata.set("authorization", `Bearer ${env("ONPREM_TOKEN")}`);
const group = env("ONPREM_GROUP");

type Cell = string | number | boolean | null;

// One cell of a column-oriented batch, in JSON terms (64-bit integers stay strings).
function cell(type: ValueType, values: ColumnValues, row: number): Cell {
  if (values.nulls[row]) {
    return null;
  }
  switch (type) {
    case ValueType.VALUE_TYPE_BOOL:
      return values.boolValues[row];
    case ValueType.VALUE_TYPE_INT64:
      return values.int64Values[row];
    case ValueType.VALUE_TYPE_DOUBLE:
      return values.doubleValues[row];
    case ValueType.VALUE_TYPE_BYTES:
      return Buffer.from(values.bytesValues[row]).toString("base64");
    default:
      return values.stringValues[row];
  }
}

async function listAgents(): Promise<object[]> {
  const client = new AgentServiceClient(address, credentials);
  try {
    const response = await new Promise<ListAgentsResponse>((resolve, reject) =>
      client.listAgents({ group }, metadata, (error, reply) => (error ? reject(error) : resolve(reply!))),
    );
    return response.agents.map((agent) => ({
      name: agent.name,
      group: agent.group,
      state: agentStateToJSON(agent.state),
      profiles: agent.profiles.map((p) => `${profileKindToJSON(p.kind)}:${p.name}`).sort(),
    }));
  } finally {
    client.close();
  }
}

async function query(request: QueryRequest): Promise<object> {
  const client = new DatabaseServiceClient(address, credentials);
  try {
    const columns: { name: string; type: ValueType }[] = [];
    const rows: Cell[][] = [];
    let rowCount = "";
    for await (const message of client.query(request, metadata)) {
      // A server stream is a Node Readable: its async iterator yields `any`.
      const result = (message as QueryResponse).result;
      if (result?.$case === "header") {
        columns.push(...result.value.columns.map((c) => ({ name: c.name, type: c.type })));
      } else if (result?.$case === "rows") {
        for (let i = 0; i < result.value.rowCount; i++) {
          rows.push(columns.map((column, c) => cell(column.type, result.value.columns[c], i)));
        }
      } else if (result?.$case === "summary") {
        rowCount = result.value.rowCount;
      }
    }
    return {
      columns: columns.map((c) => ({ name: c.name, type: valueTypeToJSON(c.type) })),
      rows,
      rowCount,
    };
  } finally {
    client.close();
  }
}

async function readFile(profile: string, path: string): Promise<object> {
  const client = new FileServiceClient(address, credentials);
  try {
    const chunks: Buffer[] = [];
    let info: object = {};
    let sha256 = "";
    for await (const message of client.read({ group, profile, path, offset: "0", length: "0" }, metadata)) {
      const part = (message as ReadResponse).part;
      if (part?.$case === "info") {
        info = { path: part.value.path, name: part.value.name, size: part.value.size };
      } else if (part?.$case === "data") {
        chunks.push(part.value);
      } else if (part?.$case === "sha256") {
        sha256 = part.value;
      }
    }
    const data = Buffer.concat(chunks);
    return {
      info,
      bytes: data.length,
      sha256,
      sha256Verified: createHash("sha256").update(data).digest("hex") === sha256,
    };
  } finally {
    client.close();
  }
}

// What a program branches on: the code, and the google.rpc.Status details in grpc-status-details-bin.
function describeError(error: ServiceError): object {
  const described: { code: number; reason?: string; domain?: string; fieldViolations?: object[] } = {
    code: error.code,
  };
  const [raw] = error.metadata.get("grpc-status-details-bin");
  if (raw === undefined) {
    return described;
  }
  const status = Status.decode(raw as Buffer);
  for (const detail of status.details as Any[]) {
    if (detail.typeUrl === "type.googleapis.com/google.rpc.ErrorInfo") {
      const info = ErrorInfo.decode(detail.value);
      described.reason = info.reason;
      described.domain = info.domain;
    } else if (detail.typeUrl === "type.googleapis.com/google.rpc.BadRequest") {
      described.fieldViolations = BadRequest.decode(detail.value).fieldViolations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    }
  }
  return described;
}

async function failingQuery(request: QueryRequest): Promise<object> {
  try {
    await query(request);
  } catch (error) {
    return describeError(error as ServiceError);
  }
  throw new Error(`the query ${JSON.stringify(request)} did not fail`);
}

async function main(): Promise<void> {
  const databaseProfile = env("ONPREM_DATABASE_PROFILE");
  const result = {
    agents: await listAgents(),
    query: await query({
      group,
      profile: databaseProfile,
      sql: env("ONPREM_SQL"),
      parameters: {},
      maxRows: "0",
    }),
    file: await readFile(env("ONPREM_FOLDER_PROFILE"), env("ONPREM_FILE_PATH")),
    errors: {
      missingSql: await failingQuery({ group, profile: databaseProfile, sql: " ", parameters: {}, maxRows: "0" }),
      foreignGroup: await failingQuery({
        group: env("ONPREM_FOREIGN_GROUP"),
        profile: databaseProfile,
        sql: "SELECT 1",
        parameters: {},
        maxRows: "0",
      }),
    },
  };
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((error: unknown) => {
  process.stderr.write(`interop failed: ${error instanceof Error ? error.stack : String(error)}\n`);
  process.exit(1);
});
