// An independent ttrpc client for the interoperability test: containerd's
// Go implementation (Debian's golang-github-containerd-ttrpc-dev), built in
// GOPATH mode by test/test_ttrpc_interop.py, calling the Python fast lane.
//
// Usage: ttrpc_client SOCKET CALL...
//
//	exec COMMAND [KEY=VALUE...]   vyra.ipc.ModuleService/ExecuteCommand
//	unknown                       a method the server does not have
//	sleep SECONDS TIMEOUT         vyra.ipc.test.EchoService/Sleep with a deadline
//	misbehave HOW                 vyra.ipc.test.StatusService/Misbehave
//
// Prints one JSON object per call on stdout: the response fields, or the
// error's gRPC status code, message and status details (type URL and
// base64 value of each).
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"
)

// The messages of vyra.ipc.ModuleService and the test EchoService, declared
// by hand with the protobuf struct tags the gogo runtime reads (no code
// generator needed); field numbers as in the .proto files.

type CommandRequest struct {
	Command    string            `protobuf:"bytes,1,opt,name=command,proto3"`
	Parameters map[string]string `protobuf:"bytes,2,rep,name=parameters,proto3" protobuf_key:"bytes,1,opt,name=key,proto3" protobuf_val:"bytes,2,opt,name=value,proto3"`
}

func (m *CommandRequest) Reset()         { *m = CommandRequest{} }
func (m *CommandRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*CommandRequest) ProtoMessage()    {}

type CommandResponse struct {
	StatusCode int32  `protobuf:"varint,1,opt,name=status_code,proto3"`
	Result     string `protobuf:"bytes,2,opt,name=result,proto3"`
}

func (m *CommandResponse) Reset()         { *m = CommandResponse{} }
func (m *CommandResponse) String() string { return fmt.Sprintf("%+v", *m) }
func (*CommandResponse) ProtoMessage()    {}

type SleepRequest struct {
	Seconds float64 `protobuf:"fixed64,1,opt,name=seconds,proto3"`
}

func (m *SleepRequest) Reset()         { *m = SleepRequest{} }
func (m *SleepRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*SleepRequest) ProtoMessage()    {}

type SleepReply struct {
	TimeRemaining float64 `protobuf:"fixed64,1,opt,name=time_remaining,proto3"`
	WasActive     bool    `protobuf:"varint,2,opt,name=was_active,proto3"`
}

func (m *SleepReply) Reset()         { *m = SleepReply{} }
func (m *SleepReply) String() string { return fmt.Sprintf("%+v", *m) }
func (*SleepReply) ProtoMessage()    {}

type MisbehaveRequest struct {
	How string `protobuf:"bytes,1,opt,name=how,proto3"`
}

func (m *MisbehaveRequest) Reset()         { *m = MisbehaveRequest{} }
func (m *MisbehaveRequest) String() string { return fmt.Sprintf("%+v", *m) }
func (*MisbehaveRequest) ProtoMessage()    {}

type EchoReply struct {
	Text string `protobuf:"bytes,1,opt,name=text,proto3"`
}

func (m *EchoReply) Reset()         { *m = EchoReply{} }
func (m *EchoReply) String() string { return fmt.Sprintf("%+v", *m) }
func (*EchoReply) ProtoMessage()    {}

func report(value interface{}, err error) {
	out := map[string]interface{}{}
	if err != nil {
		st, _ := status.FromError(err)
		out["error_code"] = int(st.Code())
		out["error_message"] = st.Message()
		if details := st.Proto().GetDetails(); len(details) > 0 {
			listed := []map[string]string{}
			for _, detail := range details {
				listed = append(listed, map[string]string{
					"type_url": detail.GetTypeUrl(),
					"value":    base64.StdEncoding.EncodeToString(detail.GetValue()),
				})
			}
			out["error_details"] = listed
		}
	} else {
		out["response"] = value
	}
	line, _ := json.Marshal(out)
	fmt.Println(string(line))
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: ttrpc_client SOCKET exec|unknown|sleep|misbehave ...")
		os.Exit(2)
	}
	conn, err := net.Dial("unix", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	args := os.Args[2:]
	// The deadline sent to the server (timeout_nano) may be set apart from
	// the client's own, so the status observed is the server's answer.
	var sentTimeout time.Duration
	interceptor := func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response,
		info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
		if sentTimeout > 0 {
			req.TimeoutNano = sentTimeout.Nanoseconds()
		}
		return invoker(ctx, req, resp)
	}
	client := ttrpc.NewClient(conn, ttrpc.WithUnaryClientInterceptor(interceptor))
	defer client.Close()

	switch args[0] {
	case "exec":
		request := &CommandRequest{Command: args[1], Parameters: map[string]string{}}
		for _, pair := range args[2:] {
			kv := strings.SplitN(pair, "=", 2)
			request.Parameters[kv[0]] = kv[1]
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var response CommandResponse
		err := client.Call(ctx, "vyra.ipc.ModuleService", "ExecuteCommand", request, &response)
		report(response, err)
	case "unknown":
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var response CommandResponse
		err := client.Call(ctx, "vyra.ipc.ModuleService", "NoSuchMethod", &CommandRequest{}, &response)
		report(nil, err)
	case "sleep":
		seconds, _ := strconv.ParseFloat(args[1], 64)
		timeout, _ := strconv.ParseFloat(args[2], 64)
		// The server is sent the deadline; the Go side waits 5 s longer, so
		// the answer observed is the server's DEADLINE_EXCEEDED.
		sentTimeout = time.Duration(timeout * float64(time.Second))
		ctx, cancel := context.WithTimeout(context.Background(), sentTimeout+5*time.Second)
		defer cancel()
		var reply SleepReply
		err := client.Call(ctx, "vyra.ipc.test.EchoService", "Sleep", &SleepRequest{Seconds: seconds}, &reply)
		report(reply, err)
	case "misbehave":
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var reply EchoReply
		err := client.Call(ctx, "vyra.ipc.test.StatusService", "Misbehave", &MisbehaveRequest{How: args[1]}, &reply)
		report(reply, err)
	default:
		fmt.Fprintln(os.Stderr, "unknown call", args[0])
		os.Exit(2)
	}
}
