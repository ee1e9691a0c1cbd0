// A Go client built only from the generated Go stubs (build/stubs/go): it lists agents, streams a
// query, reads a file and provokes two errors through a running control plane, over TLS with a bearer
// token, and prints what it saw as one JSON document, shaped like the Node program's output
// (tools/stubs/ts/interop.ts; tests/test_interop_go.py checks both the same way).
//
// Inputs (environment): ONPREM_ADDRESS (host:port of the operator API), ONPREM_CA_FILE (PEM of the
// control plane's CA), ONPREM_TOKEN (operator bearer token), ONPREM_GROUP, ONPREM_DATABASE_PROFILE,
// ONPREM_SQL, ONPREM_FOLDER_PROFILE, ONPREM_FILE_PATH, ONPREM_FOREIGN_GROUP (a group the token may not use).
package main

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"time"

	onpremv1 "github.com/onprem/onprem/gen/go/onprem/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type agentOut struct {
	Name     string   `json:"name"`
	Group    string   `json:"group"`
	State    string   `json:"state"`
	Profiles []string `json:"profiles"`
}

type columnOut struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

type queryOut struct {
	Columns  []columnOut     `json:"columns"`
	Rows     [][]interface{} `json:"rows"`
	RowCount string          `json:"rowCount"`
}

type fileInfoOut struct {
	Path string `json:"path"`
	Name string `json:"name"`
	Size string `json:"size"`
}

type fileOut struct {
	Info           fileInfoOut `json:"info"`
	Bytes          int         `json:"bytes"`
	Sha256         string      `json:"sha256"`
	Sha256Verified bool        `json:"sha256Verified"`
}

type violationOut struct {
	Field       string `json:"field"`
	Description string `json:"description"`
}

type errorOut struct {
	Code            int            `json:"code"`
	Reason          string         `json:"reason,omitempty"`
	Domain          string         `json:"domain,omitempty"`
	FieldViolations []violationOut `json:"fieldViolations,omitempty"`
}

type result struct {
	Agents []agentOut          `json:"agents"`
	Query  queryOut            `json:"query"`
	File   fileOut             `json:"file"`
	Errors map[string]errorOut `json:"errors"`
}

func env(name string) string {
	value := os.Getenv(name)
	if value == "" {
		fail(fmt.Errorf("%s is not set", name))
	}
	return value
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "interop failed: %v\n", err)
	os.Exit(1)
}

// One cell of a column-oriented batch, in JSON terms (64-bit integers stay strings).
func cell(kind onpremv1.ValueType, values *onpremv1.ColumnValues, row int) interface{} {
	if row < len(values.Nulls) && values.Nulls[row] {
		return nil
	}
	switch kind {
	case onpremv1.ValueType_VALUE_TYPE_BOOL:
		return values.BoolValues[row]
	case onpremv1.ValueType_VALUE_TYPE_INT64:
		return strconv.FormatInt(values.Int64Values[row], 10)
	case onpremv1.ValueType_VALUE_TYPE_DOUBLE:
		return values.DoubleValues[row]
	case onpremv1.ValueType_VALUE_TYPE_BYTES:
		return base64.StdEncoding.EncodeToString(values.BytesValues[row])
	default:
		return values.StringValues[row]
	}
}

func listAgents(ctx context.Context, conn *grpc.ClientConn, group string) ([]agentOut, error) {
	response, err := onpremv1.NewAgentServiceClient(conn).ListAgents(ctx, &onpremv1.ListAgentsRequest{Group: group})
	if err != nil {
		return nil, err
	}
	agents := []agentOut{}
	for _, agent := range response.Agents {
		profiles := []string{}
		for _, p := range agent.Profiles {
			profiles = append(profiles, p.Kind.String()+":"+p.Name)
		}
		sort.Strings(profiles)
		agents = append(agents, agentOut{agent.Name, agent.Group, agent.State.String(), profiles})
	}
	return agents, nil
}

func query(ctx context.Context, conn *grpc.ClientConn, request *onpremv1.QueryRequest) (queryOut, error) {
	out := queryOut{Columns: []columnOut{}, Rows: [][]interface{}{}}
	stream, err := onpremv1.NewDatabaseServiceClient(conn).Query(ctx, request)
	if err != nil {
		return out, err
	}
	var columns []*onpremv1.Column
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		switch part := message.Result.(type) {
		case *onpremv1.QueryResponse_Header:
			columns = part.Header.Columns
			for _, c := range columns {
				out.Columns = append(out.Columns, columnOut{c.Name, c.Type.String()})
			}
		case *onpremv1.QueryResponse_Rows:
			for i := 0; i < int(part.Rows.RowCount); i++ {
				row := make([]interface{}, len(columns))
				for c, column := range columns {
					row[c] = cell(column.Type, part.Rows.Columns[c], i)
				}
				out.Rows = append(out.Rows, row)
			}
		case *onpremv1.QueryResponse_Summary:
			out.RowCount = strconv.FormatUint(part.Summary.RowCount, 10)
		}
	}
}

func readFile(ctx context.Context, conn *grpc.ClientConn, group, profile, path string) (fileOut, error) {
	var out fileOut
	stream, err := onpremv1.NewFileServiceClient(conn).Read(ctx, &onpremv1.ReadRequest{
		Group: group, Profile: profile, Path: path,
	})
	if err != nil {
		return out, err
	}
	digest := sha256.New()
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return out, err
		}
		switch part := message.Part.(type) {
		case *onpremv1.ReadResponse_Info:
			out.Info = fileInfoOut{part.Info.Path, part.Info.Name, strconv.FormatUint(part.Info.Size, 10)}
		case *onpremv1.ReadResponse_Data:
			out.Bytes += len(part.Data)
			digest.Write(part.Data)
		case *onpremv1.ReadResponse_Sha256:
			out.Sha256 = part.Sha256
		}
	}
	out.Sha256Verified = hex.EncodeToString(digest.Sum(nil)) == out.Sha256
	return out, nil
}

// What a program branches on: the code, and the google.rpc.Status details.
func describeError(err error) errorOut {
	s := status.Convert(err)
	out := errorOut{Code: int(s.Code())}
	for _, detail := range s.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			out.Reason, out.Domain = d.Reason, d.Domain
		case *errdetails.BadRequest:
			for _, v := range d.FieldViolations {
				out.FieldViolations = append(out.FieldViolations, violationOut{v.Field, v.Description})
			}
		}
	}
	return out
}

func failingQuery(ctx context.Context, conn *grpc.ClientConn, request *onpremv1.QueryRequest) errorOut {
	if _, err := query(ctx, conn, request); err != nil {
		return describeError(err)
	}
	fail(fmt.Errorf("the query %v did not fail", request))
	return errorOut{}
}

func main() {
	ca, err := credentials.NewClientTLSFromFile(env("ONPREM_CA_FILE"), "")
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, env("ONPREM_ADDRESS"), grpc.WithTransportCredentials(ca), grpc.WithBlock())
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+env("ONPREM_TOKEN"))
	group, databaseProfile := env("ONPREM_GROUP"), env("ONPREM_DATABASE_PROFILE")

	var out result
	if out.Agents, err = listAgents(ctx, conn, group); err != nil {
		fail(err)
	}
	if out.Query, err = query(ctx, conn, &onpremv1.QueryRequest{
		Group: group, Profile: databaseProfile, Sql: env("ONPREM_SQL"),
	}); err != nil {
		fail(err)
	}
	if out.File, err = readFile(ctx, conn, group, env("ONPREM_FOLDER_PROFILE"), env("ONPREM_FILE_PATH")); err != nil {
		fail(err)
	}
	out.Errors = map[string]errorOut{
		"missingSql": failingQuery(ctx, conn, &onpremv1.QueryRequest{Group: group, Profile: databaseProfile, Sql: " "}),
		"foreignGroup": failingQuery(ctx, conn, &onpremv1.QueryRequest{
			Group: env("ONPREM_FOREIGN_GROUP"), Profile: databaseProfile, Sql: "SELECT 1",
		}),
	}
	encoded, err := json.Marshal(out)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(encoded))
}
