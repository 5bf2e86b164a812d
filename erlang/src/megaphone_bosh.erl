%% @doc One BOSH request, run end to end in a process of its own.
%%
%% ejabberd_bosh:process_request/3 blocks its caller for as long as the
%% client's long-poll waits (up to `wait' seconds), so each request gets its
%% own short-lived process: the session process that starts it never blocks.
%% The answer goes straight to the sidecar, not back through the session.
-module(megaphone_bosh).

-export([start/6, run/6, session_id/1, valid_peer/1, error_response/4]).

-define(BYTE(X), (is_integer(X) andalso X >= 0 andalso X =< 255)).
-define(PORT(X), (is_integer(X) andalso X >= 0 andalso X =< 65535)).

-type peer() :: {inet:ip_address(), inet:port_number()}.
-export_type([peer/0]).

%% How long a worker waits for the one before it in its BOSH session to
%% hand its request to ejabberd_bosh: polls 1 ms apart. That takes
%% microseconds (a parse and a table lookup); the bound only keeps a worker
%% from waiting on one that is stuck elsewhere.
-define(HANDOFF_POLLS, 100).

%% @doc Starts a monitored worker for one request. Prev is the worker of
%% the request the sidecar sent just before it in the same BOSH session
%% (none if there is none in flight): see wait_handed_over/2.
-spec start(pid(), non_neg_integer(), non_neg_integer(), peer(), binary(), pid() | none) ->
          {pid(), reference()}.
start(Sidecar, ConnId, ReqId, Peer, Body, Prev) ->
    spawn_monitor(?MODULE, run, [Sidecar, ConnId, ReqId, Peer, Body, Prev]).

%% @private The worker's body.
-spec run(pid(), non_neg_integer(), non_neg_integer(), peer(), binary(), pid() | none) -> ok.
run(Sidecar, ConnId, ReqId, Peer, Body, Prev) ->
    wait_handed_over(Prev, ?HANDOFF_POLLS),
    Reply = try ejabberd_bosh:process_request(Body, Peer, xml) of
                {Status, Reason, Headers, RespBody} when is_integer(Status) ->
                    {bosh_response, ConnId, ReqId, Status, to_binary(Reason),
                     [{to_binary(N), to_binary(V)} || {N, V} <- Headers],
                     iolist_to_binary(RespBody)}
            catch
                error:undef ->
                    error_response(ConnId, ReqId, 503, <<"ejabberd's BOSH is not running">>);
                Class:Error ->
                    logger:error("megaphone: ejabberd_bosh failed on request ~p/~p: ~p:~p",
                                 [ConnId, ReqId, Class, Error]),
                    error_response(ConnId, ReqId, 500, <<"Internal Server Error">>)
            end,
    %% noconnect: if the sidecar's node is gone, so is the client; the
    %% session process will kill us anyway.
    erlang:send(Sidecar, Reply, [noconnect]),
    ok.

%% Waits until Prev, the previous worker of this request's BOSH session,
%% has handed its request to the session's ejabberd_bosh process (it waits
%% in gen:call for the answer, so its request is in that process's mailbox)
%% or has ended. The sidecar sends a session's requests in rid order; two
%% workers started a moment apart could still reach ejabberd_bosh the other
%% way round, and ejabberd_bosh (23.01, 24.12) never comes back to a request
%% that came early when the one before it is an empty poll it holds: the
%% client waits for its stanza until the session ends (bosh/order.go).
-spec wait_handed_over(pid() | none, non_neg_integer()) -> ok.
wait_handed_over(none, _) ->
    ok;
wait_handed_over(_, 0) ->
    ok;
wait_handed_over(Prev, N) ->
    case erlang:process_info(Prev, [status, current_function]) of
        undefined -> ok;
        [{status, waiting}, {current_function, {gen, do_call, 4}}] -> ok;
        _ -> receive after 1 -> wait_handed_over(Prev, N - 1) end
    end.

%% @doc The sid attribute of a BOSH body's root element, or none. Reads
%% the root's start tag only: the session process calls it for every
%% request. The sidecar has checked the body is well-formed XML.
-spec session_id(binary()) -> binary() | none.
session_id(Body) ->
    try root_attrs(Body) of
        Sid when is_binary(Sid) -> Sid;
        _ -> none
    catch
        _:_ -> none
    end.

root_attrs(<<"<?", _/binary>> = B) -> root_attrs(skip_past(B, <<"?>">>));
root_attrs(<<"<!--", _/binary>> = B) -> root_attrs(skip_past(B, <<"-->">>));
root_attrs(<<"<", Rest/binary>>) -> attr(skip_name(Rest));
root_attrs(<<_, Rest/binary>>) -> root_attrs(Rest).

skip_past(B, End) ->
    {Pos, Len} = binary:match(B, End),
    binary:part(B, Pos + Len, byte_size(B) - Pos - Len).

skip_name(<<C, _/binary>> = B) when C =:= $\s; C =:= $\t; C =:= $\r; C =:= $\n; C =:= $/; C =:= $> -> B;
skip_name(<<_, Rest/binary>>) -> skip_name(Rest).

attr(<<C, Rest/binary>>) when C =:= $\s; C =:= $\t; C =:= $\r; C =:= $\n -> attr(Rest);
attr(<<C, _/binary>>) when C =:= $/; C =:= $> -> none;
attr(B) ->
    [Name, AfterEq] = binary:split(B, <<"=">>),
    <<Q, Value0/binary>> = string:trim(AfterEq, leading),
    true = Q =:= $' orelse Q =:= $",
    [Value, Rest] = binary:split(Value0, <<Q>>),
    case string:trim(Name) of
        <<"sid">> -> Value;
        _ -> attr(Rest)
    end.

%% @doc An HTTP error for a request that ejabberd could not answer.
-spec error_response(non_neg_integer(), non_neg_integer(), 100..999, binary()) -> tuple().
error_response(ConnId, ReqId, Status, Reason) ->
    {bosh_response, ConnId, ReqId, Status, Reason,
     [{<<"Content-Type">>, <<"text/plain; charset=utf-8">>}], Reason}.

%% @doc Whether a term is an {IP, Port} pair as ejabberd expects it.
-spec valid_peer(term()) -> boolean().
valid_peer({{A, B, C, D}, Port})
  when ?BYTE(A), ?BYTE(B), ?BYTE(C), ?BYTE(D), ?PORT(Port) ->
    true;
valid_peer({{_, _, _, _, _, _, _, _} = IP, Port}) when ?PORT(Port) ->
    lists:all(fun(W) -> is_integer(W) andalso W >= 0 andalso W =< 65535 end,
              tuple_to_list(IP));
valid_peer(_) ->
    false.

to_binary(B) when is_binary(B) -> B;
to_binary(L) when is_list(L) -> unicode:characters_to_binary(L);
to_binary(A) when is_atom(A) -> atom_to_binary(A, utf8);
to_binary(I) when is_integer(I) -> integer_to_binary(I).
